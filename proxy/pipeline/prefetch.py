"""Prefetch: warm the node cache for a reference, through the same verification.

GPU nodes pay for every minute a pod waits on a registry. ``prefetch`` resolves and
verifies the manifest (every child of an index), then fills each referenced blob
into the cache exactly as a pull would, reporting progress as it goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from proxy.oci.digest import Digest
from proxy.oci.errors import Denied, OCIError, Unsupported
from proxy.oci.manifest import Manifest
from proxy.oci.reference import ImageReference
from proxy.pipeline import Pipeline
from proxy.pipeline.fills import Fill
from proxy.pipeline.follow import Follow
from proxy.pipeline.walk import IndexWalk
from proxy.upstream.router import UpstreamRouter


@dataclass(frozen=True, slots=True)
class PrefetchEvent:
    """One progress line: ``kind`` is manifest, skipped (a refused attestation),
    blob, progress, done or error."""

    kind: str
    reference: str
    digest: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


async def prefetch(
    pipeline: Pipeline,
    router: UpstreamRouter,
    reference: str,
    *,
    progress_interval: float = 0.5,
) -> AsyncIterator[PrefetchEvent]:
    """Verify and cache everything ``reference`` needs; yields progress events."""
    if not pipeline.store.caching:
        raise Unsupported("prefetch needs a cache: start pullgate with --cache-dir")
    ref = ImageReference.parse(reference)
    route = router.route(ref.registry)
    # As the node, under the private-repository rule like any request without
    # credentials: a private repository's cached content is nobody's to list.
    served = await pipeline.guard(
        route,
        ref.repository,
        f"manifests/{ref.reference}",
        None,
        lambda: pipeline.get_manifest(route, ref.repository, ref.reference),
    )
    manifests: list[Manifest] = [served.manifest]
    yield PrefetchEvent(
        "manifest", reference, str(served.manifest.digest), message=served.verdict.reason
    )
    children = IndexWalk(pipeline, route, ref.repository, served.manifest)
    async for child in children:
        child_digest = str(child.descriptor.digest)
        if child.attestation and isinstance(child.error, Denied):
            # Never pulled as a platform: its refusal fails no pull, nor the prefetch.
            yield PrefetchEvent("skipped", reference, child_digest, message=child.error.message)
            continue
        # A refused or unreachable platform ends the prefetch, as it would fail its pull.
        manifests.append(child.result().manifest)
        yield PrefetchEvent("manifest", reference, child_digest, message="child verified")
    wanted: dict[Digest, int] = {}
    for manifest in manifests:
        for descriptor in (*manifest.layers, *([manifest.config] if manifest.config else [])):
            wanted[descriptor.digest] = descriptor.size
    total = sum(wanted.values())
    fills: list[Fill | Follow] = []
    cached = 0
    for digest in wanted:
        if not pipeline.store.accepts(digest):
            continue  # not cacheable here (the disk store keeps sha256 only)
        if pipeline.store.path_of(digest) is not None:
            cached += wanted[digest]
            continue
        fills.append(await pipeline.start_fill(route, ref.repository, digest))
    summary = f"{len(wanted)} blobs, {len(fills)} to fetch"
    if children.not_checked:
        summary += f"; {children.not_checked} more index children not fetched"
    yield PrefetchEvent(
        "blob",
        reference,
        done_bytes=cached,
        total_bytes=total,
        message=summary,
    )
    waiter = asyncio.ensure_future(asyncio.gather(*(_wait_fill(f) for f in fills)))
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=progress_interval)
            done = cached + sum(
                (f.size or 0) if f.state == "committed" else f.written for f in fills
            )
            yield PrefetchEvent("progress", reference, done_bytes=done, total_bytes=total)
        failures = [f for f in fills if f.state != "committed"]
        if failures:
            reasons = "; ".join(f"{f.digest}: {f.error}" for f in failures)
            yield PrefetchEvent("error", reference, message=reasons, total_bytes=total)
            return
        yield PrefetchEvent(
            "done", reference, str(served.manifest.digest), done_bytes=total, total_bytes=total
        )
    finally:
        if not waiter.done():
            waiter.cancel()
        for fill in fills:
            pipeline.fills.reader_left(fill)


async def _wait_fill(fill: Fill | Follow) -> None:
    while not fill.done:
        await fill.wait_change()


async def prefetch_all(
    pipeline: Pipeline, router: UpstreamRouter, references: list[str]
) -> AsyncIterator[PrefetchEvent]:
    for reference in references:
        try:
            async for event in prefetch(pipeline, router, reference):
                yield event
        except OCIError as exc:
            yield PrefetchEvent("error", reference, message=f"{exc.code}: {exc.message}")
