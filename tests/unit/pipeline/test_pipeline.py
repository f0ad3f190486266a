"""The pipeline in process, against a fake upstream registry on loopback.

The app is started (``start_mirror``) so the upstream session and router exist as in
``serve``; the tests then call the ``Pipeline`` directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.errors import BlobNotAllowed, StreamAborted, UpstreamUnavailable
from proxy.oci.reference import ManifestRef
from proxy.pipeline import BlobStream
from tests.support.inprocess import (
    ALLOW_APP_POLICY,
    REGISTRY,
    FakeRegistry,
    Image,
    Mirror,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)
from tests.support.peers import free_port

LAYER = bytes((i * 13 + i // 509) & 0xFF for i in range(768 * 1024 + 7))


class CollectingSink:
    """A ``BlobSink`` that keeps what it was sent, send by send."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    async def thread_sender(self) -> Callable[[memoryview], None]:
        def send(data: memoryview) -> None:
            self.pieces.append(bytes(data))  # a copy: the streamer reuses its buffers

        return send

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        raise AssertionError("an uncached stream never uses sendfile")

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry(chunk=32 * 1024)


@pytest.fixture
def image(upstream: FakeRegistry) -> Image:
    return upstream.add_image("app/web", "1.0", LAYER)


@pytest.fixture
async def mirror(upstream: FakeRegistry, image: Image, tmp_path: Path) -> AsyncIterator[Mirror]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_APP_POLICY)
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy)) as running,
    ):
        yield running


async def _open_stream(
    mirror: Mirror, digest: Digest, range_header: str | None = None
) -> BlobStream:
    blob = await mirror.pipeline.open_blob(
        mirror.route(), "app/web", digest, range_header=range_header
    )
    assert isinstance(blob, BlobStream)  # no cache: a verifying stream
    return blob


async def test_manifest_is_the_exact_upstream_bytes_and_allows_its_blobs(
    mirror: Mirror, image: Image
) -> None:
    served = await mirror.pipeline.get_manifest(mirror.route(), "app/web", ManifestRef(tag="1.0"))
    assert served.manifest.raw == image.manifest
    assert served.manifest.digest == image.digest
    assert served.verdict.allowed and not served.offline
    assert served.manifest.blob_digests == {image.config, *image.layers}
    # Nothing raised: the manifest's blobs are allowed now.
    for digest in served.manifest.blob_digests:
        mirror.pipeline.check_blob_allowed(mirror.route(), "app/web", digest)


async def test_refuses_blob_before_its_manifest_without_asking_upstream(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    with pytest.raises(BlobNotAllowed, match="not referenced by any verified manifest"):
        await mirror.pipeline.open_blob(
            mirror.route(), "app/web", image.layers[0], range_header=None
        )
    assert upstream.requests_for("blobs") == []


async def test_streams_uncached_blob_with_the_right_bytes(mirror: Mirror, image: Image) -> None:
    await mirror.pipeline.get_manifest(mirror.route(), "app/web", ManifestRef(tag="1.0"))
    stream = await _open_stream(mirror, image.layers[0])
    assert (stream.size, stream.content_length) == (len(LAYER), len(LAYER))
    sink = CollectingSink()
    try:
        await stream.send_to(sink)
    finally:
        stream.close()
    assert sink.received == LAYER
    assert len(sink.pieces) > 1  # streamed, not buffered whole

    ranged = await _open_stream(mirror, image.layers[0], "bytes=5-40000")
    sink = CollectingSink()
    try:
        await ranged.send_to(sink)
    finally:
        ranged.close()
    assert ranged.content_length == 39996
    assert sink.received == LAYER[5:40001]


async def test_refuses_to_send_the_tail_of_a_corrupted_blob(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    upstream.corrupt.add(image.layers[0])
    await mirror.pipeline.get_manifest(mirror.route(), "app/web", ManifestRef(tag="1.0"))
    stream = await _open_stream(mirror, image.layers[0])
    sink = CollectingSink()
    with pytest.raises(StreamAborted, match="upstream bytes hash to"):
        try:
            await stream.send_to(sink)
        finally:
            stream.close()
    # Bytes flowed while hashing, but the held-back tail never went out.
    assert 0 < len(sink.received) < len(LAYER)
    mismatches = mirror.metrics.registry.get_sample_value(
        "pullgate_blob_digest_mismatch_total", {"registry": REGISTRY}
    )
    assert mismatches == 1


async def test_tags_query_is_passed_upstream_as_given(
    mirror: Mirror, upstream: FakeRegistry
) -> None:
    body, link = await mirror.pipeline.tags(mirror.route(), "app/web", "n=5&last=a%26x%3D1")
    assert b'"1.0"' in body and link is None
    (seen,) = upstream.requests_for("tags/list")
    assert seen.query == {"n": "5", "last": "a&x=1"}


async def test_unreachable_upstream_is_upstream_unavailable(tmp_path: Path) -> None:
    config = mirror_config(f"http://127.0.0.1:{free_port()}")
    async with start_mirror(config) as mirror:
        with pytest.raises(UpstreamUnavailable, match="cannot connect to upstream"):
            await mirror.pipeline.get_manifest(mirror.route(), "app/web", ManifestRef(tag="1.0"))
