"""The admin listener: prefetch, metrics and health, kept off the registry port."""

from __future__ import annotations

import dataclasses
import json

from aiohttp import web

from proxy.cache.disk import DiskBlobStore
from proxy.cache.scrub import scrub_once
from proxy.http.app import (
    CONFIG_KEY,
    METRICS_KEY,
    PIPELINE_KEY,
    ROUTER_KEY,
    metrics_handler,
    oci_errors,
    readyz_response,
)
from proxy.oci.errors import OCIError, PathInvalid, Unsupported
from proxy.pipeline.prefetch import prefetch_all

MAIN_APP_KEY = web.AppKey("main_app", web.Application)

MAX_PREFETCH_REFERENCES = 64


async def prefetch_handler(request: web.Request) -> web.StreamResponse:
    """``POST /admin/prefetch`` with ``{"references": [...]}`` (or ``?ref=`` repeated).

    Streams one JSON object per line: manifest, blob, progress, done or error events.
    """
    main = request.app[MAIN_APP_KEY]
    if request.method not in ("POST", "GET"):
        raise Unsupported("use POST /admin/prefetch")
    references = request.query.getall("ref", [])
    if request.method == "POST" and request.can_read_body:
        try:
            body = await request.json()
        except ValueError as exc:
            raise PathInvalid(f"request body is not JSON: {exc}") from exc
        refs = body.get("references") if isinstance(body, dict) else None
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise PathInvalid('body must be {"references": ["registry/repo:tag", ...]}')
        references.extend(refs)
    if not references:
        raise PathInvalid("name at least one reference to prefetch")
    if len(references) > MAX_PREFETCH_REFERENCES:
        raise PathInvalid(f"at most {MAX_PREFETCH_REFERENCES} references per request")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    failed = False
    try:
        async for event in prefetch_all(main[PIPELINE_KEY], main[ROUTER_KEY], references):
            failed = failed or event.kind == "error"
            await response.write(json.dumps(event.to_json()).encode() + b"\n")
    except OCIError as exc:
        failed = True
        line = {"kind": "error", "message": f"{exc.code}: {exc.message}"}
        await response.write(json.dumps(line).encode() + b"\n")
    summary = {"kind": "summary", "ok": not failed, "references": len(references)}
    await response.write(json.dumps(summary).encode() + b"\n")
    await response.write_eof()
    return response


async def scrub_handler(request: web.Request) -> web.Response:
    """``POST /admin/scrub``: run one scrub pass now and answer with its report."""
    main = request.app[MAIN_APP_KEY]
    pipeline = main[PIPELINE_KEY]
    store = pipeline.store
    if not isinstance(store, DiskBlobStore):
        raise Unsupported("scrub needs a cache: start pullgate with --cache-dir")
    report = await scrub_once(
        store,
        metrics=main[METRICS_KEY],
        pool=pipeline.hash_pool,
        bytes_per_second=main[CONFIG_KEY].cache.scrub_bytes_per_second,
    )
    return web.json_response(dataclasses.asdict(report))


def build_admin_app(main: web.Application) -> web.Application:
    """The admin app shares the main app's pipeline, router and metrics."""
    admin = web.Application(middlewares=[oci_errors])
    admin[MAIN_APP_KEY] = main
    admin[METRICS_KEY] = main[METRICS_KEY]
    admin[PIPELINE_KEY] = main[PIPELINE_KEY]
    admin.router.add_route("*", "/admin/prefetch", prefetch_handler)
    admin.router.add_post("/admin/scrub", scrub_handler)
    admin.router.add_get("/metrics", metrics_handler)
    admin.router.add_get("/healthz", lambda _: _healthz())
    admin.router.add_get("/readyz", lambda _: _readyz(main))
    return admin


async def _healthz() -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(main: web.Application) -> web.Response:
    return readyz_response(main)
