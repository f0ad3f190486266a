"""The pipeline with its two stores: blobs (``store=``) and verified manifests with
their verdicts and tag resolutions (``manifests=``), here the in-memory ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from proxy.cache import NoStore
from proxy.cache.disk import CacheLimits
from proxy.cache.memory import MemoryBlobStore, MemoryVerifiedManifests
from proxy.cache.verified import NoVerifiedManifests, VerifiedManifestStore
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.reference import ManifestRef
from proxy.pipeline import BlobFile, Pipeline
from proxy.pipeline.gate import AllowAllGate
from proxy.upstream.router import Route
from tests.unit.cache.fakes import FakeUpstream, blob_of
from tests.unit.verify.manifests import OCI_MANIFEST, image

REGISTRY = "r.test"
LIMITS = CacheLimits(max_bytes=64 * 1024**2, min_free_bytes=0)


class FakeClient:
    """``UpstreamClient.get`` over a dict of paths; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.paths: dict[str, FakeUpstream] = {}
        self.down = False

    async def get(self, path: str, *, scope: str, **_: Any) -> Any:
        if self.down:
            raise UpstreamUnavailable("connection refused")
        upstream = self.paths.get(path)
        if upstream is None:
            return await FakeUpstream(b"", status=404).open()
        return await upstream.open()

    async def get_blob(
        self, path: str, *, scope: str, expected_sizes: frozenset[int] = frozenset()
    ) -> Any:
        """No transports: a blob comes from the origin (``get``)."""
        return await self.get(path, scope=scope)


def _push(client: FakeClient, layer: bytes) -> Digest:
    """An image with one layer under ``app:v1`` and by digest; its manifest digest."""
    manifest = image(layer).raw
    digest = Digest.of(manifest)
    served = FakeUpstream(manifest, headers={"Content-Type": OCI_MANIFEST})
    client.paths["/v2/app/manifests/v1"] = served
    client.paths[f"/v2/app/manifests/{digest}"] = served
    client.paths[f"/v2/app/blobs/{Digest.of(layer)}"] = FakeUpstream(layer)
    return digest


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def route(client: FakeClient) -> Route:
    return Route(registry=REGISTRY, client=cast(Any, client), explicit_ns=True)


@pytest.fixture
async def blobs() -> AsyncIterator[MemoryBlobStore]:
    store = MemoryBlobStore(limits=LIMITS)
    yield store
    store.close()


def _pipeline(
    store: MemoryBlobStore | NoStore, manifests: VerifiedManifestStore, **options: Any
) -> Pipeline:
    return Pipeline(
        gate=AllowAllGate(), store=store, manifests=manifests, metrics=Metrics(), **options
    )


async def test_verified_manifest_and_tag_go_to_the_manifest_store(
    client: FakeClient, route: Route, blobs: MemoryBlobStore
) -> None:
    manifests = MemoryVerifiedManifests()
    digest = _push(client, b"layer one")
    pipeline = _pipeline(blobs, manifests)
    try:
        served = await pipeline.get_manifest(route, "app", ManifestRef(tag="v1"))
    finally:
        await pipeline.close()
    assert served.manifest.digest == digest and not served.offline
    stored = manifests.get_manifest(digest)
    assert stored is not None and stored.raw == served.manifest.raw
    assert stored.verdicts[f"{REGISTRY}/app"]["allowed"] is True
    tag = manifests.get_tag(f"{REGISTRY}/app", "v1")
    assert tag is not None and tag.digest == digest
    assert len(blobs) == 0, "the blob store keeps blobs only"


async def test_a_restarted_pipeline_serves_verified_content_from_its_stores_offline(
    client: FakeClient, route: Route, blobs: MemoryBlobStore
) -> None:
    manifests = MemoryVerifiedManifests()
    layer = b"layer two" * 1000
    digest = _push(client, layer)
    first = _pipeline(blobs, manifests, tag_staleness=300.0)
    try:
        await first.get_manifest(route, "app", ManifestRef(tag="v1"))
        fill = await first.start_fill(route, "app", Digest.of(layer))
        while not fill.done:
            await fill.wait_change()
        first.fills.reader_left(fill)
        assert fill.state == "committed", fill.error
    finally:
        await first.close()

    client.down = True
    second = _pipeline(blobs, manifests, tag_staleness=300.0)
    try:
        served = await second.get_manifest(route, "app", ManifestRef(tag="v1"))
        assert served.offline and served.manifest.digest == digest
        blob = await second.open_blob(route, "app", Digest.of(layer), range_header=None)
    finally:
        await second.close()
    assert isinstance(blob, BlobFile), "a committed blob is served from the store"
    assert blob.path.is_relative_to(blobs.root) and blob.path.read_bytes() == layer


async def test_without_a_manifest_store_an_unreachable_upstream_is_an_error(
    client: FakeClient, route: Route
) -> None:
    _push(client, b"layer three")
    pipeline = _pipeline(NoStore(), NoVerifiedManifests(), tag_staleness=300.0)
    try:
        await pipeline.get_manifest(route, "app", ManifestRef(tag="v1"))
        client.down = True
        with pytest.raises(UpstreamUnavailable, match="never verified here"):
            await pipeline.get_manifest(route, "app", ManifestRef(tag="v1"))
    finally:
        await pipeline.close()


async def test_blob_fills_commit_into_the_memory_store(
    client: FakeClient, route: Route, blobs: MemoryBlobStore
) -> None:
    data, digest = blob_of(3 * 1024 * 1024, seed=7)
    client.paths[f"/v2/app/blobs/{digest}"] = FakeUpstream(data)
    pipeline = _pipeline(blobs, MemoryVerifiedManifests())
    try:
        fill = await pipeline.start_fill(route, "app", digest)
        while not fill.done:
            await fill.wait_change()
        pipeline.fills.reader_left(fill)
    finally:
        await pipeline.close()
    assert fill.state == "committed", fill.error
    path = blobs.path_of(digest)
    assert path is not None and path.read_bytes() == data
    assert blobs.total_bytes == len(data) and blobs.reserved_bytes == 0
