"""The upstream side: one aiohttp session, token auth, retries, error mapping.

aiohttp and timeout errors never leave this module: they become
``UpstreamUnavailable``/``UpstreamTimeout``/``UpstreamError`` at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from proxy.config import RetryConfig, TimeoutConfig, UpstreamConfig
from proxy.metrics import Metrics
from proxy.oci.errors import (
    OCIError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.upstream.auth import (
    Challenge,
    Credentials,
    parse_challenge,
    realm_is_fetchable,
    realm_is_trusted,
    requester_credentials,
)
from proxy.upstream.body import BodyReader, LoopBody, SocketBody, rate_floor

if TYPE_CHECKING:
    from proxy.upstream.transports import TransportChain

log = logging.getLogger("pullgate.upstream")

MAX_TOKEN_RESPONSE = 64 * 1024
# Tokens kept per client (scopes times identities); expired ones go first.
MAX_TOKENS = 4096
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 30.0
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Bodies at least this long are read straight from the socket (``body_reader``); the
# connection is then closed, not reused, which smaller bodies are not worth.
TAKEOVER_MIN_BYTES = 1024 * 1024
# What ``iter_body`` joins into one piece for a reader in another thread, at most.
BODY_BATCH = 4 * 1024 * 1024


# How long a requester's token is reused: as long as proxy.pipeline.access remembers
# that the upstream accepted its credentials (ACCEPTED_TTL).
REQUESTER_TOKEN_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class _Token:
    header: str
    expires_at: float


class ByteCounter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class CountingBody:
    """A body whose bytes are counted as they are read (bytes by transport)."""

    def __init__(self, body: BodyReader, counter: ByteCounter) -> None:
        self._body = body
        self._counter = counter

    def readinto(self, view: memoryview) -> int:
        count = self._body.readinto(view)
        if count:
            self._counter.inc(count)
        return count

    def cancel(self) -> None:
        self._body.cancel()

    def close(self) -> None:
        self._body.close()


class UpstreamResponse:
    """An open upstream response. Always close it (``async with``).

    ``source`` names who answered: ``origin`` (the upstream itself) or a transport
    (``proxy.upstream.transports``); a blob body's bytes go to ``bytes_counter`` and
    ``report_broken`` tells the transport its body was wrong. A body, read through
    ``body_reader`` or ``read_capped``, is held to ``min_rate`` bytes per second
    (``RateFloor``; 0: off).
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        idle_timeout: float = 60.0,
        source: str = "origin",
        bytes_counter: ByteCounter | None = None,
        on_broken: Callable[[str], None] | None = None,
        min_rate: float = 0.0,
        min_rate_window: float = 30.0,
    ) -> None:
        self._response = response
        self._idle_timeout = idle_timeout
        self._min_rate = min_rate
        self._min_rate_window = min_rate_window
        # The verified size the body must have (``expect_length``), if known.
        self._expected_length: int | None = None
        self._detached = False
        self.source = source
        self.bytes_counter = bytes_counter
        self._on_broken = on_broken

    @property
    def trusted(self) -> bool:
        """Whether the body is the origin's own: what a transport served proves
        nothing about the blob (a refusal of its bytes is not remembered)."""
        return self._on_broken is None

    def report_broken(self, *, truncated: bool, slow: bool = False) -> None:
        """The body did not hash to its digest (``truncated`` False), broke off, or
        came below the minimum rate (``slow``): a transport that served it is marked
        bad and bypassed (no-op for the origin)."""
        if self._on_broken is not None:
            self._on_broken("slow" if slow else "broken" if truncated else "digest")

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict(self._response.headers)

    @property
    def content_length(self) -> int | None:
        """The length the body must have: the upstream's ``Content-Length``, else the
        verified size given to ``expect_length``, else None (unknown)."""
        length = self._response.content_length
        return self._expected_length if length is None else length

    def expect_length(self, sizes: frozenset[int], *, what: str) -> None:
        """Bind the body to ``sizes`` (verified descriptors'; usually one):
        ``UpstreamError``, naming the sizes, if the upstream announced another length;
        without a length, the largest becomes the body's, so a body that runs past
        it is cut."""
        announced = self._response.content_length
        if announced is not None and announced not in sizes:
            says = " or ".join(str(size) for size in sorted(sizes))
            raise UpstreamError(
                f"the upstream ({self.source}) announced a Content-Length of {announced} "
                f"bytes for {what}, "
                f"but the verified manifest's descriptor says {says} bytes"
            )
        self._expected_length = max(sizes)

    async def read_capped(self, limit: int, *, what: str) -> bytes | None:
        """Read the whole body, or None if it exceeds ``limit`` bytes.

        Held to the same ``min_rate`` as blob bodies: a manifest or signature trickled
        just inside the read timeout would otherwise hold its pull for hours.
        """
        length = self._response.content_length
        if length is not None and length > limit:
            return None
        floor = rate_floor(self._min_rate, self._min_rate_window)
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                started = time.monotonic()
                chunk = await self._response.content.read(256 * 1024)
                if floor is not None:
                    floor.waited(time.monotonic() - started, total + len(chunk))
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    return None
                chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise map_client_error(exc, f"reading {what}") from exc
        return b"".join(chunks)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives: each piece the socket delivered, joined with
        what is buffered behind it (up to ``BODY_BATCH`` bytes).

        A reader in another thread pays one loop round trip per piece; through TLS a
        piece is one decrypted read (tens of KiB), so joining what is already there
        costs one copy and saves most round trips. Errors leave as ``OCIError``s
        (``map_client_error``), never as aiohttp's own.
        """
        content = self._response.content
        while True:
            try:
                chunk, end_of_http_chunk = await content.readchunk()
                if chunk and len(chunk) < BODY_BATCH:
                    behind = content.read_nowait(BODY_BATCH - len(chunk))
                    if behind:
                        chunk = b"".join((chunk, behind))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise map_client_error(exc, "reading a body") from exc
            if chunk:
                yield chunk
            elif not end_of_http_chunk:
                return  # (b"", False) is end of body

    def body_reader(self) -> BodyReader:
        """The body, for a worker thread to read: straight from the socket when the
        hop is plain HTTP with a known length (of ``TAKEOVER_MIN_BYTES`` or more) and
        no transfer coding, else through the event loop (``iter_body``). Close the
        response afterwards either way; a taken socket is never returned to the
        connection pool."""
        body = self._body_reader()
        if self.bytes_counter is not None:
            return CountingBody(body, self.bytes_counter)
        return body

    def _body_reader(self) -> BodyReader:
        response = self._response
        length = response.content_length
        connection = response.connection
        transport = connection.transport if connection is not None else None
        protocol = connection.protocol if connection is not None else None
        sock = None
        if (
            length is not None
            and length >= TAKEOVER_MIN_BYTES
            and transport is not None
            and protocol is not None
            and transport.get_extra_info("sslcontext") is None
            and "Transfer-Encoding" not in response.headers
        ):
            sock = transport.get_extra_info("socket")
        floor = rate_floor(self._min_rate, self._min_rate_window)
        if sock is None or length is None or protocol is None:
            return LoopBody(self.iter_body(), asyncio.get_running_loop(), floor=floor)
        try:
            buffered = response.content.read_nowait(-1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise map_client_error(exc, "reading a body") from exc
        # Draining may have resumed reading; from here on the loop never reads this
        # socket again (and aiohttp's read timeout is off: the thread keeps its own).
        protocol.pause_reading()
        self._detached = True
        return SocketBody(
            fd=os.dup(sock.fileno()),
            prefix=buffered,
            remaining=length - len(buffered),
            idle_timeout=self._idle_timeout,
            floor=floor,
        )

    def discard(self) -> None:
        """Close without reading the body: the connection is not reused."""
        self._response.close()

    def close(self) -> None:
        if self._detached:
            self._response.close()  # the socket was read behind aiohttp's back
        else:
            self._response.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def map_client_error(exc: BaseException, doing: str) -> OCIError:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream timed out while {doing}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"cannot connect to upstream while {doing}: {exc.os_error}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamError(f"upstream body broke off while {doing}: {exc}")
    return UpstreamError(f"upstream error while {doing}: {type(exc).__name__}: {exc}")


class UpstreamClient:
    """Talks to one upstream registry on behalf of one registry name (``ns=``)."""

    def __init__(
        self,
        *,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        credentials: Credentials | None,
        timeouts: TimeoutConfig,
        retries: RetryConfig,
        metrics: Metrics,
        transports: TransportChain | None = None,
        metrics_label: str | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        # The registry label of its metrics (the router bounds how many there are).
        self._label = metrics_label or config.name
        self.transports = transports
        self._origin_bytes = metrics.transport_bytes.labels(self._label, "origin")
        self._session = session
        self._credentials = credentials
        self._retries = retries
        self._metrics = metrics
        self._read_timeout = float(timeouts.read)
        # The origin's minimum blob rate: its upstream's own, else every origin's.
        self._min_rate = config.min_rate if config.min_rate is not None else timeouts.min_rate
        self._min_rate_window = (
            config.min_rate_window
            if config.min_rate_window is not None
            else timeouts.min_rate_window
        )
        self._metrics_refused = metrics.upstream_bodies_refused
        self._headers_deadline = timeouts.connect + timeouts.read
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._ssl: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(config.ca_file))
        # Keyed by (scope, identity): the node's ("") or a requester's fingerprint.
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}

    def url(self, path: str) -> str:
        return self.config.url + path

    async def get_blob(
        self, path: str, *, scope: str, expected_sizes: frozenset[int] = frozenset()
    ) -> UpstreamResponse:
        """GET a blob by digest (``path``): through the transports first, in order,
        then from the origin (``get``). The caller checks the digest as always and
        calls ``report_broken`` on a mismatch.

        ``expected_sizes`` is the blob's size in the verified manifests that allow it
        (several only when served manifests disagree; a length must be one of them):
        a transport announcing another length is skipped (and marked bad), the origin
        refused (``UpstreamError`` naming both sizes) before any byte goes out, and a
        body without a length is bound to the largest. None (not known: no policy, or no
        manifest of it passed here) keeps the upstream's word for the length.
        """

        async def from_origin() -> UpstreamResponse:
            response = await self.get(path, scope=scope)
            response.bytes_counter = self._origin_bytes
            if expected_sizes and response.status == 200:
                try:
                    response.expect_length(expected_sizes, what=f"blob {path.rsplit('/', 1)[-1]}")
                except UpstreamError as exc:
                    response.discard()
                    self._metrics_refused.labels(self._label, "origin", "length").inc()
                    log.warning("refusing %s from %s: %s", path, self.name, exc.message)
                    raise
            return response

        if self.transports is None:
            return await from_origin()
        return await self.transports.open_blob(
            path, origin=from_origin, expected_sizes=expected_sizes
        )

    async def get(
        self,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        ok_statuses: frozenset[int] = frozenset({200, 206}),
        pass_statuses: frozenset[int] = frozenset({404}),
    ) -> UpstreamResponse:
        """Send an idempotent request, with auth, redirects and bounded retries.

        Returns responses with a status in ``ok_statuses`` or ``pass_statuses``;
        anything else is mapped to an ``OCIError`` here.
        """
        attempts = self._retries.attempts
        last_error: OCIError | None = None
        for attempt in range(1, attempts + 1):
            delay = 0.0
            try:
                response = await self._send_authorized(method, path, scope, headers or {})
            except OCIError as exc:
                if not isinstance(exc, (UpstreamUnavailable, UpstreamTimeout)):
                    raise
                last_error = exc
                delay = self._backoff(attempt)
                self._metrics.upstream_retries.labels(self._label, "connection").inc()
            else:
                status = response.status
                self._metrics.upstream_requests.labels(self._label, str(status)).inc()
                if status in ok_statuses or status in pass_statuses:
                    return UpstreamResponse(
                        response,
                        idle_timeout=self._read_timeout,
                        min_rate=self._min_rate,
                        min_rate_window=self._min_rate_window,
                    )
                body = await _short_body(response)
                response.release()
                if status in RETRYABLE_STATUSES:
                    last_error = _status_error(status, body, self.name)
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    delay = self._backoff(attempt) if retry_after is None else retry_after
                    self._metrics.upstream_retries.labels(self._label, str(status)).inc()
                else:
                    raise _status_error(status, body, self.name)
            if attempt < attempts:
                log.info(
                    "retrying %s %s on %s in %.2fs (attempt %d/%d): %s",
                    method,
                    path,
                    self.name,
                    delay,
                    attempt + 1,
                    attempts,
                    last_error.message if last_error else "",
                )
                await asyncio.sleep(delay)
        assert last_error is not None
        raise last_error

    def _backoff(self, attempt: int) -> float:
        base: float = min(self._retries.max_backoff, self._retries.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    def _identity(self) -> tuple[Credentials | None, str]:
        """Who this request acts as: a requester's credentials (``acting_as``) or the
        node's; and the key its tokens are cached under."""
        requester = requester_credentials()
        if requester is not None:
            return requester, requester.fingerprint
        return self._credentials, ""

    def _refused_identity(self) -> str:
        credentials, key = self._identity()
        if key:
            return "the request's credentials were refused"
        if credentials is not None:
            return "the node credentials were refused"
        return f"no node credentials are configured for {self.name}"

    async def _send_authorized(
        self, method: str, path: str, scope: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        credentials, identity = self._identity()
        key = (scope, identity)
        auth = self._cached_auth(key)
        if auth is None and credentials is not None and credentials.registry_token:
            auth = f"Bearer {credentials.registry_token}"
        response = await self._send(method, self.url(path), headers, auth)
        if response.status != 401:
            return response
        challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
        response.release()
        if challenge is None:
            raise Unauthorized(
                f"upstream {self.name} requires authentication but sent no usable challenge"
            )
        auth = await self._authorize(challenge, key, credentials)
        response = await self._send(method, self.url(path), headers, auth)
        if response.status == 401:
            response.release()
            self._tokens.pop(key, None)
            self._token_locks.pop(key, None)
            raise Unauthorized(
                f"upstream {self.name} requires authentication: {self._refused_identity()}"
            )
        return response

    async def _send(
        self, method: str, url: str, headers: dict[str, str], auth: str | None
    ) -> aiohttp.ClientResponse:
        origin = urlsplit(url)
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers)
            # Authorization goes only to the upstream itself, never to a redirect target
            # on another host (blob storage, CDN), nor in plain text after https (the
            # same netloc: without ports, https://host and http://host share one).
            target = urlsplit(url)
            downgraded = origin.scheme == "https" and target.scheme != "https"
            if auth is not None and target.netloc == origin.netloc and not downgraded:
                send_headers["Authorization"] = auth
            # ``sock_read`` restarts with every byte: headers dripped just inside it
            # would never hit it. Each hop gets connect + read for its headers, no more.
            headers_within = self._headers_deadline
            try:
                async with asyncio.timeout(headers_within) as deadline:
                    response = await self._session.request(
                        method,
                        url,
                        headers=send_headers,
                        allow_redirects=False,
                        timeout=self._timeout,
                        ssl=self._ssl,
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                if deadline.expired():
                    raise UpstreamTimeout(
                        f"upstream {self.name} sent no complete response headers within "
                        f"{headers_within:g}s of {method} {urlsplit(url).path}"
                    ) from exc
                raise map_client_error(exc, f"requesting {method} {urlsplit(url).path}") from exc
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                response.release()
                if not location:
                    raise UpstreamError(f"upstream {self.name} redirected without a Location")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise UpstreamError(f"upstream {self.name} redirected to a non-HTTP URL")
                continue
            return response
        raise UpstreamError(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    def _cached_auth(self, key: tuple[str, str]) -> str | None:
        token = self._tokens.get(key)
        if token is not None and token.expires_at > time.monotonic():
            return token.header
        return None

    def _keep_token(self, key: tuple[str, str], token: _Token) -> None:
        if key[1]:
            # A requester's token lives no longer than the check that accepted its
            # credentials is remembered: a password revoked upstream stops working
            # within a minute, not when an hour-long token expires.
            cap = time.monotonic() + REQUESTER_TOKEN_SECONDS
            token = _Token(token.header, min(token.expires_at, cap))
        if len(self._tokens) >= MAX_TOKENS:
            now = time.monotonic()
            for stale in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[stale]
                self._token_locks.pop(stale, None)
            while len(self._tokens) >= MAX_TOKENS:  # the oldest entries go
                oldest = next(iter(self._tokens))
                del self._tokens[oldest]
                self._token_locks.pop(oldest, None)
        self._tokens[key] = token

    async def _authorize(
        self, challenge: Challenge, key: tuple[str, str], credentials: Credentials | None
    ) -> str | None:
        if challenge.scheme == "basic":
            if credentials is None or not (credentials.username or credentials.password):
                raise Unauthorized(
                    f"upstream {self.name} requires basic auth: {self._refused_identity()}"
                )
            header = credentials.basic_header()
            self._keep_token(key, _Token(header, time.monotonic() + 3600))
            return header
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                cached = self._cached_auth(key)
                if cached is not None:
                    return cached
                token = await self._fetch_token(challenge, key[0], credentials)
                self._keep_token(key, token)
                return token.header
        finally:
            # A lock lives as long as its token: refused credentials (anyone can send
            # new ones) leave nothing behind.
            if key not in self._tokens and self._token_locks.get(key) is lock:
                del self._token_locks[key]

    async def _fetch_token(
        self, challenge: Challenge, scope: str, credentials: Credentials | None
    ) -> _Token:
        realm = challenge.realm
        if not realm or not realm_is_fetchable(realm):
            raise Unauthorized(
                f"upstream {self.name} sent a bearer challenge without a usable realm"
            )
        query = {"service": challenge.params.get("service", "")}
        query["scope"] = challenge.params.get("scope") or scope
        headers: dict[str, str] = {}
        form: dict[str, str] | None = None
        trusted = realm_is_trusted(realm, self.config.url, self.config.token_realm_hosts)
        if credentials is not None and not trusted:
            log.warning(
                "token realm %s is outside the trust boundary of upstream %s; "
                "requesting an anonymous token instead of sending credentials",
                realm,
                self.name,
            )
        elif credentials is not None and credentials.identity_token:
            # An identity token is an OAuth2 refresh token: exchanged by POST.
            form = {
                **query,
                "grant_type": "refresh_token",
                "refresh_token": credentials.identity_token,
                "client_id": "pullgate",
            }
        elif credentials is not None:
            headers["Authorization"] = credentials.basic_header()
        if form is None:
            url, method = realm + ("&" if "?" in realm else "?") + urlencode(query), "GET"
        else:
            url, method = realm, "POST"
        try:
            # Small and read whole: headers and body within connect + read, like headers.
            async with asyncio.timeout(self._headers_deadline):
                async with self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=form,
                    allow_redirects=False,
                    timeout=self._timeout,
                    ssl=self._ssl,
                ) as response:
                    if response.status != 200:
                        refused = " (credentials refused)" if headers or form else ""
                        raise Unauthorized(
                            f"token service of {self.name} answered {response.status}{refused}"
                        )
                    body = await UpstreamResponse(response).read_capped(
                        MAX_TOKEN_RESPONSE, what="token response"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise map_client_error(exc, "fetching a token") from exc
        if body is None:
            raise UpstreamError(
                f"token response from {self.name} is over {MAX_TOKEN_RESPONSE} bytes"
            )
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise UpstreamError(f"token response from {self.name} is not valid JSON") from exc
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"token response from {self.name} carries no token")
        # Renew a little early; never trust absurd lifetimes.
        lifetime = max(5.0, min(expires_in, 3600.0) - 5.0)
        return _Token(f"Bearer {token}", time.monotonic() + lifetime)


async def _short_body(response: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(Exception):
        data = await asyncio.wait_for(response.content.read(2048), timeout=2)
        return data.decode("utf-8", "replace")
    return ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, min(when.timestamp() - time.time(), MAX_RETRY_AFTER))
    return None


def _status_error(status: int, body: str, name: str) -> OCIError:
    detail = body.strip().replace("\n", " ")[:300]
    if status == 429:
        return TooManyRequests(f"upstream {name} is rate limiting (429): {detail}")
    if status == 403:
        return Unauthorized(f"upstream {name} refused access (403): {detail}")
    if status >= 500:
        return UpstreamError(f"upstream {name} answered {status}: {detail}")
    return UpstreamError(f"upstream {name} answered unexpected status {status}: {detail}")
