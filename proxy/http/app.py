"""The HTTP front end: parse, call the pipeline, render. Errors render in one place."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.cache.disk import DiskBlobStore
from proxy.config import Config
from proxy.http.sendfile import flush, sendfile, socket_fd
from proxy.metrics import Metrics
from proxy.oci.errors import (
    CredentialsRequired,
    Denied,
    DeniedWithoutPod,
    InternalError,
    OCIError,
    RouteUnknown,
    StreamAborted,
    Unsupported,
    VerificationFailed,
)
from proxy.oci.ranges import parse_range
from proxy.oci.reference import DistributionPath, Endpoint, parse_distribution_path
from proxy.pipeline import BlobFile, BlobStream, Pipeline
from proxy.pipeline.access import PullGrant
from proxy.pipeline.fills import FillReader
from proxy.pipeline.stream import SocketSender
from proxy.upstream.auth import credentials_from_header
from proxy.upstream.router import Route, UpstreamRouter

log = logging.getLogger("pullgate.http")
access_log = logging.getLogger("pullgate.access")

PIPELINE_KEY = web.AppKey("pipeline", Pipeline)
ROUTER_KEY = web.AppKey("router", UpstreamRouter)
METRICS_KEY = web.AppKey("metrics", Metrics)
CONFIG_KEY = web.AppKey("config", Config)

POD_GRANT_KEY = web.RequestKey("pod_grant", PullGrant)
# What the request's access log line says beyond method, path and status.
ACCESS_FIELDS = web.RequestKey("access_fields", dict[str, Any])
STARTED_AT = web.RequestKey("started_at", float)
ENDPOINT = web.RequestKey("endpoint", str)

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = frozenset({"GET", "HEAD"})
MAX_QUERY_LENGTH = 2048
QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: OCIError, *, head: bool = False) -> web.Response:
    headers = dict(API_VERSION_HEADER)
    if isinstance(error, Unsupported):
        headers["Allow"] = "GET, HEAD"
    if isinstance(error, CredentialsRequired):
        headers["WWW-Authenticate"] = 'Basic realm="pullgate", charset="UTF-8"'
    if head:
        return web.Response(status=error.status, headers=headers)
    return web.json_response(error.to_json(), status=error.status, headers=headers)


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every refusal as OCI error JSON with the status bound to its class."""
    metrics = request.app[METRICS_KEY]
    started = time.perf_counter()
    endpoint = "other"
    fields = request[ACCESS_FIELDS] = {}
    request[STARTED_AT] = started
    try:
        response = await handler(request)
        endpoint = request.get(ENDPOINT, "other")
    except OCIError as error:
        endpoint = request.get(ENDPOINT, "other")
        fields.update(code=error.code, reason=error.message)
        response = error_response(error, head=request.method == "HEAD")
    except web.HTTPException:
        raise
    except Exception:
        # A bug, not a refusal and not the upstream's fault: 500 UNKNOWN, logged in full.
        endpoint = request.get(ENDPOINT, "other")
        log.exception("internal error on %s %s", request.method, request.path_qs[:200])
        response = error_response(
            InternalError("internal error while handling the request; see pullgate's log"),
            head=request.method == "HEAD",
        )
    elapsed = time.perf_counter() - started
    metrics.requests.labels(endpoint, request.method, str(response.status)).inc()
    metrics.request_seconds.labels(endpoint).observe(elapsed)
    _access_line(request, response, fields, elapsed)
    return response


_BLOB_SOURCES: dict[type, str] = {BlobFile: "cache", FillReader: "fill", BlobStream: "upstream"}


def _first_byte(request: web.Request, kind: str, source: str) -> None:
    """Time to the first byte: from the request's arrival until its response starts."""
    elapsed = time.perf_counter() - request[STARTED_AT]
    request.app[METRICS_KEY].first_byte.labels(kind, source).observe(elapsed)


def _body_bytes(request: web.Request, response: web.StreamResponse) -> int:
    """Body bytes sent (a streamed body), or about to be sent (a prepared one)."""
    if response.prepared or request.method == "HEAD":
        return response.body_length
    return response.content_length or 0


def _access_line(
    request: web.Request, response: web.StreamResponse, fields: dict[str, Any], elapsed: float
) -> None:
    """One log line per request (``pullgate.access``): refusals by policy at WARNING.
    Probes and scrapes (``/metrics``, ``/healthz``, ``/readyz``) are not logged."""
    if request.path in QUIET_PATHS:
        return
    request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex[:16]
    fields = {
        "request_id": request_id,
        "front": "mirror",
        "method": request.method,
        "path": request.path_qs[:300],
        "status": response.status,
        "bytes": _body_bytes(request, response),
        "duration_ms": round(elapsed * 1000, 3),
        **fields,
    }
    denied = fields.get("code") == "DENIED"
    access_log.log(
        logging.WARNING if denied else logging.INFO,
        "%s %s -> %d%s",
        request.method,
        fields["path"],
        response.status,
        f" {fields['code']}: {fields['reason']}" if "code" in fields else "",
        extra={"fields": fields},
    )


async def dispatch(request: web.Request) -> web.StreamResponse:
    raw_path, _, query = request.raw_path.partition("?")
    if raw_path in ("/metrics", "/healthz", "/readyz"):
        return await _admin(request, raw_path)
    # Writes are refused before the path is even parsed: whatever the path, the answer
    # to a push is that this mirror is read-only.
    if request.method not in READ_METHODS:
        request[ENDPOINT] = "write"
        raise Unsupported(f"{request.method} is not supported: pullgate is a read-only mirror")
    parsed = parse_distribution_path(raw_path)
    request[ENDPOINT] = parsed.endpoint.value
    if len(query) > MAX_QUERY_LENGTH:
        raise RouteUnknown("query string is too long")
    if parsed.endpoint is Endpoint.BASE:
        return web.json_response({}, headers=API_VERSION_HEADER)
    router = request.app[ROUTER_KEY]
    ns = request.query.get("ns")
    route = router.route(ns)
    headers = dict(API_VERSION_HEADER)
    if route.explicit_ns:
        headers["OCI-Namespace"] = route.registry
    handler, probe = _ENDPOINTS[parsed.endpoint]
    pipeline = request.app[PIPELINE_KEY]
    reference = parsed.reference if parsed.reference is not None else parsed.digest
    request[ACCESS_FIELDS].update(
        registry=route.registry, repository=parsed.repository, reference=str(reference or "")
    )
    try:
        credentials = credentials_from_header(request.headers.get("Authorization"))
    except ValueError as exc:
        raise CredentialsRequired(f"unusable Authorization header: {exc}") from None
    # containerd pulling for a pod the CRI front end checked carries that pod's grant:
    # the pod (for the manifests of that pull: scopes for pods) and its credentials.
    # A pull stays in its repository; a grant presented for another is a replay.
    grant = pipeline.grants.open(credentials)
    if grant is not None:
        if (grant.registry, grant.repository) != (route.registry, parsed.repository):
            raise Denied(
                f"the pull grant is for {grant.registry}/{grant.repository}, not "
                f"{route.registry}/{parsed.repository}; pull through the CRI"
            )
        credentials = grant.credentials
        request[POD_GRANT_KEY] = grant
    # Private repositories answer only to credentials the upstream accepts, cached
    # or not (``proxy.pipeline.access``).
    return await pipeline.guard(
        route,
        parsed.repository,
        probe(parsed),
        credentials,
        lambda: handler(request, parsed, route, headers),
    )


async def _admin(request: web.Request, path: str) -> web.StreamResponse:
    request[ENDPOINT] = path.strip("/")
    if path == "/healthz":
        return web.Response(text="ok\n")
    if path == "/readyz":
        return readyz_response(request.app)
    return await metrics_handler(request)


def readyz_response(main: web.Application) -> web.Response:
    """Ready when what this process serves from is in place: the policy it was given is
    in force and the cache directory is writable. Upstreams are not asked: a registry
    outage must not take every node's mirror out of service (the cache still serves).
    While stopping, the listeners close, so the probe fails."""
    checks: dict[str, str] = {}
    problems: list[str] = []
    pipeline = main[PIPELINE_KEY]
    if main[CONFIG_KEY].policy is None:
        checks["policy"] = "none configured (allow-all)"
    elif pipeline.gate.policy_in_force:
        checks["policy"] = f"in force (revision {pipeline.gate.revision[:16]})"
    else:
        problems.append(checks.setdefault("policy", "configured but not in force"))
    store = pipeline.store
    if not isinstance(store, DiskBlobStore):
        checks["cache"] = "none (streaming only)"
    elif os.access(store.blob_dir, os.W_OK | os.X_OK):
        checks["cache"] = f"open ({store.blob_dir})"
    else:
        problems.append(checks.setdefault("cache", f"{store.blob_dir} is not writable"))
    body = {"ready": not problems, "checks": checks}
    return web.json_response(body, status=503 if problems else 200)


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """Prometheus text exposition of this node's metrics (every worker's)."""
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _manifest(
    request: web.Request, parsed: DistributionPath, route: Route, headers: dict[str, str]
) -> web.StreamResponse:
    pipeline = request.app[PIPELINE_KEY]
    assert parsed.reference is not None
    grant = request.get(POD_GRANT_KEY)
    # containerd pulls for the pod: the granted digest and, by digest, the children of
    # that index, which are covered only for the pod whose scope verified the index.
    pod = grant.pod if grant is not None else None
    try:
        served = await pipeline.get_manifest(
            route,
            parsed.repository,
            parsed.reference,
            accept=request.headers.get("Accept"),
            pod=pod,
        )
    except VerificationFailed as exc:
        if grant is None and pipeline.gate.pod_scoped:
            # A scope for some pods might allow it: challenge, so that
            # containerd pulling for a pod presents the grant the CRI front end sealed.
            raise DeniedWithoutPod(
                f"{exc.message} (no pod context: scopes for pods apply only "
                "to pulls through the CRI front end)",
                detail=exc.detail,
            ) from None
        raise
    manifest = served.manifest
    request[ACCESS_FIELDS].update(
        digest=str(manifest.digest), verdict=served.verdict.mode, reason=served.verdict.reason
    )
    headers["Docker-Content-Digest"] = str(manifest.digest)
    headers["Content-Type"] = manifest.media_type
    headers["ETag"] = f'"{manifest.digest}"'
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(manifest.raw))
        return web.Response(status=200, headers=headers)
    _first_byte(request, "manifest", "cache" if served.offline else "upstream")
    return web.Response(body=manifest.raw, status=200, headers=headers)


async def _blob(
    request: web.Request, parsed: DistributionPath, route: Route, headers: dict[str, str]
) -> web.StreamResponse:
    pipeline = request.app[PIPELINE_KEY]
    assert parsed.digest is not None
    headers["Docker-Content-Digest"] = str(parsed.digest)
    headers["Accept-Ranges"] = "bytes"
    if request.method == "HEAD":
        size = await pipeline.head_blob(route, parsed.repository, parsed.digest)
        headers["Content-Type"] = "application/octet-stream"
        if size is not None:
            headers["Content-Length"] = str(size)
        return web.Response(status=200, headers=headers)
    blob = await pipeline.open_blob(
        route, parsed.repository, parsed.digest, range_header=request.headers.get("Range")
    )
    return await _send_body(request, blob, headers, pipeline)


class _ResponseSink:
    """``BlobSink`` over a prepared aiohttp response."""

    def __init__(self, request: web.Request, response: web.StreamResponse, pool: Executor):
        self._request = request
        self._response = response
        self._pool = pool
        self._thread_fd = -1

    async def thread_sender(self) -> Callable[[memoryview], None]:
        # Everything aiohttp buffered (the headers) goes first; then a worker thread
        # writes the body to a duplicate of the connection's descriptor.
        await flush(self._request)
        self._thread_fd = os.dup(socket_fd(self._request))
        return SocketSender(self._thread_fd)

    def close(self) -> None:
        if self._thread_fd >= 0:
            os.close(self._thread_fd)
            self._thread_fd = -1

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        await sendfile(self._request, fd, offset, count, pool=self._pool)


async def _send_body(
    request: web.Request,
    blob: BlobStream | FillReader | BlobFile,
    headers: dict[str, str],
    pipeline: Pipeline,
) -> web.StreamResponse:
    """Send a blob body; cut the connection if it turns out wrong or incomplete."""
    if isinstance(blob, BlobFile):
        byte_range = parse_range(request.headers.get("Range"), blob.size)
        size: int | None = blob.size
        length: int | None = byte_range.length if byte_range else blob.size
    else:
        byte_range, size, length = blob.byte_range, blob.size, blob.content_length
    response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
    response.content_type = "application/octet-stream"
    if byte_range is not None and size is not None:
        response.headers["Content-Range"] = byte_range.content_range(size)
    if length is not None:
        response.content_length = length
    sink = _ResponseSink(request, response, pipeline.hash_pool)
    try:
        await response.prepare(request)
        source = _BLOB_SOURCES.get(type(blob), "upstream")
        _first_byte(request, "blob", source)
        if isinstance(blob, BlobFile):
            start = byte_range.start if byte_range else 0
            await pipeline.send_cached(blob, start, length or 0, sink)
        else:
            await blob.send_to(sink)
    except StreamAborted:
        # The body is incomplete by construction (the tail was held back): cut the
        # connection so the client sees a truncated transfer, never a complete one.
        if request.transport is not None:
            request.transport.abort()
        return response
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        log.info("client went away during blob %s: %s", blob.digest, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    except Exception:
        # A bug after the headers went out: too late for a 500, and the client must
        # not wait for bytes that will never come. Cut it, like a wrong body.
        log.exception("internal error while sending blob %s; connection cut", blob.digest)
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        sink.close()
        if not isinstance(blob, BlobFile):
            blob.close()
    await response.write_eof()
    return response


async def _tags(
    request: web.Request, parsed: DistributionPath, route: Route, headers: dict[str, str]
) -> web.StreamResponse:
    pipeline = request.app[PIPELINE_KEY]
    # Re-encoded from the decoded values, so a client's ``last=a%26x%3D1`` stays one
    # parameter upstream; anything but ``n`` and ``last`` is dropped.
    query = urlencode([(k, v) for k, v in request.rel_url.query.items() if k in ("n", "last")])
    body, link = await pipeline.tags(route, parsed.repository, query)
    headers["Content-Type"] = "application/json"
    if link:
        headers["Link"] = link
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    return web.Response(body=body, headers=headers)


async def _referrers(
    request: web.Request, parsed: DistributionPath, route: Route, headers: dict[str, str]
) -> web.StreamResponse:
    pipeline = request.app[PIPELINE_KEY]
    assert parsed.digest is not None
    artifact_type = request.query.get("artifactType")
    body = await pipeline.referrers_index(route, parsed.repository, parsed.digest, artifact_type)
    headers["Content-Type"] = "application/vnd.oci.image.index.v1+json"
    if artifact_type:
        headers["OCI-Filters-Applied"] = "artifactType"
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    return web.Response(body=body, headers=headers)


EndpointHandler = Callable[
    [web.Request, DistributionPath, Route, dict[str, str]], Awaitable[web.StreamResponse]
]
# Each endpoint's handler, and what a HEAD checks a private repository's access with.
_ENDPOINTS: dict[Endpoint, tuple[EndpointHandler, Callable[[DistributionPath], str]]] = {
    Endpoint.MANIFEST: (_manifest, lambda parsed: f"manifests/{parsed.reference}"),
    Endpoint.BLOB: (_blob, lambda parsed: f"blobs/{parsed.digest}"),
    Endpoint.TAGS: (_tags, lambda parsed: "tags/list"),
    Endpoint.REFERRERS: (_referrers, lambda parsed: f"manifests/{parsed.digest}"),
}


def build_app(
    *, config: Config, pipeline: Pipeline, router: UpstreamRouter, metrics: Metrics
) -> web.Application:
    """The aiohttp application over parts the wiring (``proxy.node``) built and runs."""
    app = web.Application(middlewares=[oci_errors], client_max_size=1024 * 1024)
    app[CONFIG_KEY] = config
    app[PIPELINE_KEY] = pipeline
    app[ROUTER_KEY] = router
    app[METRICS_KEY] = metrics
    responses = metrics.responses_here

    async def count_response(_: web.Request, __: web.StreamResponse) -> None:
        responses.inc()

    app.on_response_prepare.append(count_response)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
