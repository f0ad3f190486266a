"""BlobStore conformance: every store the pipeline may be given must pass these.

Run against ``DiskBlobStore`` (keeps everything) and ``NoStore`` (keeps nothing);
each case states what each kind must do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cache import BlobStore, NoStore
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.oci.digest import Digest

from .fakes import blob_of

LIMITS = CacheLimits(max_bytes=64 * 1024**2, min_free_bytes=0)


@pytest.fixture(params=["disk", "none"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "none":
        return NoStore()
    disk = DiskBlobStore(root=tmp_path / "cache", limits=LIMITS)
    disk.recover()
    return disk


def _commit(store: BlobStore, data: bytes, digest: Digest) -> Path:
    ingest = store.new_ingest(digest)
    ingest.write_bytes(data)
    return store.commit(digest, ingest, len(data))


def test_unknown_digest_is_a_miss(store: BlobStore) -> None:
    _, digest = blob_of(10, seed=1)
    assert store.path_of(digest) is None


def test_committed_blob_is_served_from_its_final_path(store: BlobStore) -> None:
    data, digest = blob_of(100_000, seed=2)
    if not store.caching:
        with pytest.raises(RuntimeError):
            store.new_ingest(digest)
        assert store.path_of(digest) is None
        return
    ingest = store.new_ingest(digest)
    ingest.write_bytes(data)
    final = store.commit(digest, ingest, len(data))
    assert not ingest.exists(), "commit renames the ingest file, it does not copy it"
    assert store.path_of(digest) == final
    assert final.read_bytes() == data


def test_ingest_paths_are_unique_and_outside_the_blob_area(store: BlobStore) -> None:
    _, digest = blob_of(10, seed=3)
    if not store.caching:
        assert store.make_room(10) is False
        return
    first, second = store.new_ingest(digest), store.new_ingest(digest)
    assert first != second
    assert store.path_of(digest) is None
    assert isinstance(store, DiskBlobStore)
    assert first.parent == store.ingest_dir != store.blob_dir


def test_accepts_only_what_it_can_keep(store: BlobStore) -> None:
    sha256 = Digest.of(b"x")
    sha512 = Digest.of(b"x", "sha512")
    assert store.accepts(sha256) is store.caching
    assert store.accepts(sha512) is False


def test_pin_and_unpin_balance(store: BlobStore) -> None:
    _, digest = blob_of(1000, seed=4)
    store.pin(digest)
    store.pin(digest)
    store.unpin(digest)
    if isinstance(store, DiskBlobStore):
        assert store.is_pinned(digest)
    store.unpin(digest)
    store.unpin(digest)  # one too many is harmless
    if isinstance(store, DiskBlobStore):
        assert not store.is_pinned(digest)


def test_make_room_reserves_and_release_returns_it(store: BlobStore) -> None:
    if not store.caching:
        assert store.make_room(1) is False
        store.release(1)
        return
    assert isinstance(store, DiskBlobStore)
    assert store.make_room(1000) is True
    assert store.reserved_bytes == 1000
    store.release(1000)
    assert store.reserved_bytes == 0
    assert store.make_room(LIMITS.max_bytes) is False, "a blob over the budget is not kept"
    assert store.reserved_bytes == 0


def test_verified_manifest_round_trips_with_verdict_per_repository(store: BlobStore) -> None:
    raw = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    digest = Digest.of(raw)
    media_type = "application/vnd.oci.image.manifest.v1+json"
    store.put_manifest(
        digest,
        raw,
        media_type=media_type,
        repo="r.example/a",
        verdict={"allowed": True, "verifiedAt": 100.0},
    )
    store.put_manifest(
        digest,
        raw,
        media_type=media_type,
        repo="r.example/b",
        verdict={"allowed": True, "verifiedAt": 200.0},
    )
    stored = store.get_manifest(digest)
    if not store.caching:
        assert stored is None
        return
    assert stored is not None
    assert stored.raw == raw and stored.media_type == media_type
    assert stored.verdicts["r.example/a"]["verifiedAt"] == 100.0
    assert stored.verdicts["r.example/b"]["verifiedAt"] == 200.0


def test_refuses_stored_manifest_whose_bytes_changed(store: BlobStore) -> None:
    raw = b'{"schemaVersion":2}'
    digest = Digest.of(raw)
    store.put_manifest(
        digest, raw, media_type="application/json", repo="r/a", verdict={"allowed": True}
    )
    if not isinstance(store, DiskBlobStore):
        assert store.get_manifest(digest) is None
        return
    (store.manifest_dir / digest.hex).write_bytes(b'{"schemaVersion":3}')
    assert store.get_manifest(digest) is None


def test_tag_records_are_per_repository_and_tag(store: BlobStore) -> None:
    digest = Digest.of(b"manifest")
    store.put_tag("r/a", "v1", digest, 123.5)
    found = store.get_tag("r/a", "v1")
    if not store.caching:
        assert found is None
        return
    assert found is not None
    assert found.digest == digest and found.resolved_at == 123.5
    assert store.get_tag("r/a", "v2") is None
    assert store.get_tag("r/b", "v1") is None
    store.put_tag("r/a", "v1", Digest.of(b"newer"), 200.0)
    again = store.get_tag("r/a", "v1")
    assert again is not None and again.digest == Digest.of(b"newer")


def test_disk_layout_is_blobs_sha256_hex(tmp_path: Path) -> None:
    store = DiskBlobStore(root=tmp_path, limits=LIMITS)
    store.recover()
    data, digest = blob_of(5000, seed=9)
    final = _commit(store, data, digest)
    assert final == tmp_path / "blobs" / "sha256" / digest.hex
    assert os.listdir(store.ingest_dir) == []
