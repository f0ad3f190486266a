"""Untrusted transports in front of an upstream: the cluster's own distribution engines.

A transport is anything that answers the distribution API for blobs on behalf of the
origin registry: a Dragonfly dfdaemon proxy, a Spegel node mirror, a Harbor or zot
proxy cache, a registry in proxy mode, another pullgate. ``TransportChain`` asks them
for a blob in the configured order, skipping those marked bad or down, and returns
the first good answer; when none has it, the caller asks the origin.

Nothing a transport says is trusted:

- it is asked for blobs only, by digest; manifests (by tag and by digest), signatures,
  referrers and tag lists always come from the origin, so what the gate verifies and
  what is served as "the tag" is the origin's word;
- its bytes go through the same held-back hashing stream as the origin's; the pipeline
  reports a wrong digest, a broken body or one below ``minRate`` back
  (``UpstreamResponse.report_broken``) and the transport is marked bad for ``badFor``
  seconds; a length other than the verified manifest's size for the blob marks it bad
  before a byte is read, and the next one is asked;
- it never receives credentials (neither the node's nor a requester's): the request
  carries only the origin's identity, ``?ns=<registry>``, as containerd does for its
  mirrors, so a transport that fetches from the origin itself knows where to go.

Failing over is cheap: a refused connection moves on at once; a transport that
accepts and then says nothing costs at most its ``firstByte`` timeout, after which it is
marked down for ``downFor`` seconds, so only one pull pays for it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp

from proxy.config import TransportConfig
from proxy.metrics import Metrics
from proxy.oci.errors import OCIError
from proxy.upstream.client import UpstreamResponse

log = logging.getLogger("pullgate.transports")

# Statuses that mean "not here", not "unwell": the next transport is asked, and the
# transport stays in use for other blobs.
NOT_HERE_STATUSES = frozenset({401, 403, 404})
# A shared mark file is a few dozen bytes; more is not one.
MAX_MARK_BYTES = 4096


class TransportFailed(Exception):
    """A transport did not answer usably; ``reason`` is the failover metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SharedMarks:
    """Marks shared by the serving processes of one node (the supervisor's runtime
    directory): a transport one worker marked bad is bypassed by every worker, so a
    corrupting cache costs one pull per node, not one per worker.

    One small JSON file per transport, ``{"until": <unix time>, "reason": ...}``,
    replaced atomically; a reader looks at it only when it changed (another inode or
    mtime: file timestamps are coarse, two marks in one tick share an mtime).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, registry: str, name: str) -> Path:
        key = hashlib.sha256(f"{registry}\0{name}".encode()).hexdigest()[:32]
        return self.directory / key

    def write(self, path: Path, *, until: float, reason: str) -> None:
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"until": until, "reason": reason}))
            os.replace(temporary, path)
        except OSError as exc:  # sharing is best effort: this worker still bypasses it
            log.warning("cannot share a transport mark in %s: %s", self.directory, exc)

    @staticmethod
    def read(path: Path, seen: tuple[int, int]) -> tuple[tuple[int, int], float, str] | None:
        """((inode, mtime), until, reason) if the file changed since ``seen``, else
        None (also for a file that is not a mark: a finite ``until``, a ``reason``)."""
        try:
            stat = path.stat()
            key = (stat.st_ino, stat.st_mtime_ns)
            if key == seen:
                return None
            with open(path, "rb") as file:
                doc = json.loads(file.read(MAX_MARK_BYTES))
            until = doc["until"]
            if isinstance(until, bool) or not isinstance(until, (int, float)):
                return None
            if not math.isfinite(until):
                return None
            return key, float(until), str(doc["reason"])[:200]
        except (OSError, ValueError, KeyError, TypeError):
            return None


class Transport:
    """One transport of one registry, with its own timeouts and health."""

    def __init__(
        self,
        *,
        config: TransportConfig,
        registry: str,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        marks: SharedMarks | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._marks = marks
        self._mark_path = marks.path(registry, config.name) if marks is not None else None
        self._seen_mark = (0, 0)
        self.registry = registry
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._ssl: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(config.ca_file))
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect, sock_read=config.first_byte
        )
        self._bypassed_until = 0.0
        self.reason = ""
        self.bytes_counter = metrics.transport_bytes.labels(registry, self.name)

    def bypassed(self) -> bool:
        """Marked bad or down (here or, with shared marks, by another worker), and the
        period is not over yet."""
        if self._clock() < self._bypassed_until:
            return True
        if self._mark_path is None:
            return False
        shared = SharedMarks.read(self._mark_path, self._seen_mark)
        if shared is None:
            return False
        self._seen_mark, until, reason = shared
        # Never longer than this transport's own periods (a wall clock stepped back,
        # a file that is not what a worker writes).
        left = min(until - time.time(), max(self.config.bad_for, self.config.down_for))
        if left <= 0:
            return False
        self._bypassed_until = self._clock() + left
        self.reason = reason
        return True

    def bypassed_for(self) -> float:
        return max(0.0, self._bypassed_until - self._clock())

    def mark(self, reason: str, *, bad: bool) -> None:
        """Bypass this transport for ``badFor`` (``bad``: it served wrong or broken
        bytes) or ``downFor`` seconds (it did not answer), and count it."""
        period = self.config.bad_for if bad else self.config.down_for
        self._bypassed_until = max(self._bypassed_until, self._clock() + period)
        self.reason = reason
        if self._marks is not None and self._mark_path is not None:
            left = self._bypassed_until - self._clock()
            self._marks.write(self._mark_path, until=time.time() + left, reason=reason)
        self._metrics.transport_marked_bad.labels(self.registry, self.name, reason).inc()
        self._metrics.transport_bypassed.labels(self.registry, self.name).set(1)
        log.warning(
            "transport %s of %s marked %s (%s): bypassed for %.0fs",
            self.name,
            self.registry,
            "bad" if bad else "down",
            reason,
            period,
        )

    def report_broken(self, reason: str) -> None:
        """The pipeline found a body this transport served wrong (``digest``), broken
        off (``broken``) or below its minimum rate (``slow``)."""
        self.mark(reason, bad=True)

    def refresh_gauge(self) -> None:
        self._metrics.transport_bypassed.labels(self.registry, self.name).set(
            1 if self.bypassed() else 0
        )

    def url(self, path: str) -> str:
        """``path`` on this transport, carrying the origin's identity (``ns=``), under
        its ``repositoryPrefix`` if it has one (``/v2/<prefix>/<repository>/...``)."""
        prefix = self.config.repository_prefix
        if prefix and path.startswith("/v2/"):
            path = f"/v2/{prefix}/{path[4:]}"
        separator = "&" if "?" in path else "?"
        return f"{self.config.url}{path}{separator}ns={quote(self.registry, safe='')}"

    async def open(self, method: str, path: str) -> aiohttp.ClientResponse:
        """Send the request; the open response once its headers arrived.

        Raises ``TransportFailed`` for a refused or timed-out connection, no headers
        within ``firstByte`` seconds (nor complete ones within ``connect`` +
        ``firstByte``), or a broken exchange.
        """
        # ``sock_read`` restarts with every byte: a transport dripping its headers
        # would never hit it. The whole exchange up to the headers (redirects
        # included) gets connect + firstByte, no more.
        deadline = self.config.connect + self.config.first_byte
        try:
            async with asyncio.timeout(deadline):
                response = await self._session.request(
                    method,
                    self.url(path),
                    # No Authorization, ever: a transport is not trusted with credentials
                    # (the configured headers cannot carry any, see proxy.config).
                    headers=dict(self.config.headers),
                    allow_redirects=True,
                    max_redirects=5,
                    timeout=self._timeout,
                    ssl=self._ssl,
                )
        except aiohttp.ConnectionTimeoutError as exc:
            detail = f"no connection within {self.config.connect}s"
            raise TransportFailed("timeout", detail) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise TransportFailed(
                "first_byte", f"no answer within {self.config.first_byte}s of the request"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportFailed("refused", f"cannot connect: {exc.os_error}") from exc
        except TimeoutError as exc:
            raise TransportFailed(
                "first_byte", f"no complete response headers within {deadline}s of the request"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransportFailed("error", f"{type(exc).__name__}: {exc}") from exc
        if response.history:
            refusal = self._redirect_refusal(response)
            if refusal is not None:
                response.close()
                raise TransportFailed("redirect", refusal)
        # The first-byte timeout covered the headers; the body gets the read timeout.
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = self.config.read
        return response

    def _redirect_refusal(self, response: aiohttp.ClientResponse) -> str | None:
        """Why a redirected answer is not used, or None.

        pullgate reaches what a transport cannot: the node's loopback services, the
        link-local metadata address. Their answer to a redirected GET would be
        streamed (all but the held-back tail) to a client before the digest fails, so
        a redirect elsewhere than the transport itself must have landed on an address
        that is none of those; when that cannot be told (the answer came and went with
        its connection), it is not used either.
        """
        own = urlsplit(self.config.url)
        final = response.url
        if (final.scheme, final.host, final.port) == (
            own.scheme,
            own.hostname,
            own.port or (443 if own.scheme == "https" else 80),
        ):
            return None
        connection = response.connection
        peer = None
        if connection is not None and connection.transport is not None:
            peer = connection.transport.get_extra_info("peername")
        if not peer:
            return f"redirected to {final.host}, whose address cannot be checked"
        try:
            address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return f"redirected to {final.host}, at an address that is not IP"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if (
            address.is_loopback
            or address.is_link_local
            or address.is_unspecified
            or address.is_multicast
            or address.is_reserved
        ):
            return f"redirected to {final.host}, a node-local address ({address})"
        return None


class TransportChain:
    """The ordered transports of one registry."""

    def __init__(
        self,
        *,
        registry: str,
        transports: tuple[TransportConfig, ...],
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        marks: SharedMarks | None = None,
    ) -> None:
        self.registry = registry
        self._metrics = metrics
        self.transports = [
            Transport(
                config=config,
                registry=registry,
                session=session,
                metrics=metrics,
                clock=clock,
                marks=marks,
            )
            for config in transports
        ]
        for transport in self.transports:
            transport.refresh_gauge()  # every transport has a series from the start
        metrics.add_refresher(self.refresh_gauges)

    def refresh_gauges(self) -> None:
        for transport in self.transports:
            transport.refresh_gauge()

    async def open_blob(
        self,
        path: str,
        *,
        origin: Callable[[], Awaitable[UpstreamResponse]],
        expected_sizes: frozenset[int] = frozenset(),
    ) -> UpstreamResponse:
        """The first usable answer to ``path`` (a blob by digest): from a transport in
        use, in order, else from ``origin`` (which opens it at the upstream itself).

        1. A transport marked bad or down is skipped (and counted as ``skipped``).
        2. A refused connection, a connect or first-byte timeout, a broken exchange or
           a 5xx/429 marks it down and moves on.
        3. A 401, 403 or 404 means it has not got the blob: the next one is asked.
        4. A 200 is returned, tied to the transport: its bytes are counted under its
           name and a digest mismatch reported on it marks it bad. A 200 without a
           Content-Length is not used (``no_length``): nothing would bound its body.
           Nor is one whose length is not in ``expected_sizes`` (the verified manifests'
           sizes for the blob, when known): it is marked bad (``length``).
        5. Hedging: a transport with ``hedgeAfter`` that has not answered by then is
           raced by the next candidate (transport or origin); the first usable answer
           wins and the others are cancelled. Without it, one at a time.
        """
        candidates: list[Callable[[], Awaitable[UpstreamResponse | None]]] = []
        owners: list[Transport | None] = []  # None: the origin
        for transport in self.transports:
            if transport.bypassed():
                self._failover(transport, "skipped")
                continue
            candidates.append(functools.partial(self._ask, transport, path, expected_sizes))
            owners.append(transport)
        candidates.append(origin)
        owners.append(None)
        running: dict[asyncio.Future[UpstreamResponse | None], int] = {}
        started = 0
        origin_error: OCIError | None = None

        def start_next() -> None:
            nonlocal started
            running[asyncio.ensure_future(candidates[started]())] = started
            started += 1

        start_next()
        try:
            while running:
                latest = owners[started - 1]
                hedge = None
                if latest is not None and started < len(candidates):
                    hedge = latest.config.hedge_after
                done, _ = await asyncio.wait(
                    running, timeout=hedge, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    # The latest has not answered within its hedge: race the next.
                    assert latest is not None
                    self._failover(latest, "hedged")
                    start_next()
                    continue
                winner: UpstreamResponse | None = None
                for task in done:
                    del running[task]
                    try:
                        response = task.result()
                    except OCIError as exc:  # only the origin raises
                        origin_error = exc
                        continue
                    if response is None:
                        continue
                    if winner is None:
                        winner = response
                    else:  # answered in the same turn, and lost: free its connection
                        response.close()
                if winner is not None:
                    return winner
                # The latest started answered "not here" or failed: ask the next now,
                # even while an earlier, hedged one is still on its way.
                if started < len(candidates) and started - 1 not in running.values():
                    start_next()
        finally:
            for task in running:
                task.cancel()
                task.add_done_callback(_close_unclaimed)
        assert origin_error is not None  # the origin answers or raises
        raise origin_error

    async def _ask(
        self, transport: Transport, path: str, expected_sizes: frozenset[int]
    ) -> UpstreamResponse | None:
        try:
            response = await transport.open("GET", path)
        except TransportFailed as exc:
            log.info(
                "transport %s of %s failed for %s (%s); trying the next",
                transport.name,
                self.registry,
                path,
                exc.detail,
            )
            transport.mark(exc.reason, bad=False)
            self._failover(transport, exc.reason)
            return None
        status = response.status
        if status == 200 and response.content_length is None:
            # Nothing would bound what a fill writes to the disk for it: not usable.
            response.close()
            log.info(
                "transport %s of %s answered %s without a length; trying the next",
                transport.name,
                self.registry,
                path,
            )
            self._failover(transport, "no_length")
            return None
        if status == 200:
            answer = UpstreamResponse(
                response,
                idle_timeout=transport.config.read,
                source=transport.name,
                bytes_counter=transport.bytes_counter,
                on_broken=transport.report_broken,
                min_rate=transport.config.min_rate,
                min_rate_window=transport.config.min_rate_window,
            )
            if expected_sizes:
                try:
                    answer.expect_length(expected_sizes, what=path.rsplit("/", 1)[-1])
                except OCIError as exc:
                    answer.discard()
                    log.warning(
                        "transport %s of %s: %s; trying the next",
                        transport.name,
                        self.registry,
                        exc.message,
                    )
                    self._metrics.upstream_bodies_refused.labels(
                        self.registry, transport.name, "length"
                    ).inc()
                    transport.mark("length", bad=True)
                    self._failover(transport, "length")
                    return None
            log.debug("blob %s from transport %s of %s", path, transport.name, self.registry)
            return answer
        response.release()
        if status in NOT_HERE_STATUSES:
            self._failover(transport, "not_found" if status == 404 else "status")
            return None
        log.info(
            "transport %s of %s answered %d for %s; trying the next",
            transport.name,
            self.registry,
            status,
            path,
        )
        if status >= 500 or status == 429:
            transport.mark("status", bad=False)
        self._failover(transport, "status")
        return None

    def _failover(self, transport: Transport, reason: str) -> None:
        self._metrics.transport_failovers.labels(self.registry, transport.name, reason).inc()


def _close_unclaimed(task: asyncio.Future[UpstreamResponse | None]) -> None:
    """A raced request that lost: close its response if it got one after all."""
    if task.cancelled():
        return
    if task.exception() is None:
        response = task.result()
        if response is not None:
            response.close()
