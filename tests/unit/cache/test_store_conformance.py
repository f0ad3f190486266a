"""BlobStore conformance: every store the pipeline may be given must pass these.

Run against ``DiskBlobStore`` and ``MemoryBlobStore`` (both keep blobs, under the
same budget) and ``NoStore`` (keeps nothing); each case states what each kind must do.
Only the ``BlobStore`` protocol is used here; what one implementation adds (the disk
layout, the scrub's hooks) is tested beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cache import BlobStore, NoStore
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.cache.memory import MemoryBlobStore
from proxy.oci.digest import Digest

from .fakes import blob_of

KIB = 1024
# High watermark 921.6 KiB, low 512 KiB: nine 100 KiB blobs fit, a tenth evicts five.
LIMITS = CacheLimits(max_bytes=1024 * KIB, high_watermark=0.9, low_watermark=0.5, min_free_bytes=0)
BLOB = 100 * KIB


@pytest.fixture(params=["disk", "memory", "none"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "none":
        yield NoStore()
    elif request.param == "memory":
        memory = MemoryBlobStore(limits=LIMITS)
        yield memory
        memory.close()
    else:
        disk = DiskBlobStore(root=tmp_path / "cache", limits=LIMITS)
        disk.recover()
        yield disk


def _commit(store: BlobStore, data: bytes, digest: Digest) -> Path:
    ingest = store.new_ingest(digest)
    ingest.write_bytes(data)
    return store.commit(digest, ingest, len(data))


def _put(store: BlobStore, seed: int, size: int = BLOB) -> Digest:
    data, digest = blob_of(size, seed=seed)
    _commit(store, data, digest)
    return digest


def _kept(store: BlobStore, digests: list[Digest]) -> list[bool]:
    return [store.path_of(d) is not None for d in digests]


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
    data, digest = blob_of(10, seed=3)
    if not store.caching:
        assert store.make_room(10) is False
        return
    first, second = store.new_ingest(digest), store.new_ingest(digest)
    assert first != second
    assert store.path_of(digest) is None, "an ingest path is not a stored blob"
    first.write_bytes(data)
    final = store.commit(digest, first, len(data))
    assert final.parent != second.parent, "ingest files live apart from stored blobs"


def test_accepts_only_what_it_can_keep(store: BlobStore) -> None:
    sha256 = Digest.of(b"x")
    sha512 = Digest.of(b"x", "sha512")
    assert store.accepts(sha256) is store.caching
    assert store.accepts(sha512) is False


def test_commit_refuses_a_digest_it_does_not_accept(store: BlobStore) -> None:
    if not store.caching:
        return  # nothing to commit into (new_ingest already refuses, above)
    data = b"sha512 content"
    digest = Digest.of(data, "sha512")
    ingest = store.new_ingest(Digest.of(data))
    ingest.write_bytes(data)
    with pytest.raises(ValueError):
        store.commit(digest, ingest, len(data))
    assert store.path_of(digest) is None


def test_eviction_starts_past_the_high_watermark_and_stops_at_low(store: BlobStore) -> None:
    if not store.caching:
        assert store.make_room(BLOB) is False
        return
    digests = [_put(store, seed=i) for i in range(9)]  # 900 KiB: under the high mark
    assert all(_kept(store, digests)), "nothing is evicted under the high watermark"
    paths = [store.path_of(d) for d in digests]
    newest = _put(store, seed=100)  # 1000 KiB: evict down to the low mark (512 KiB)
    assert _kept(store, digests) == [False] * 5 + [True] * 4, "least recently used first"
    assert store.path_of(newest) is not None
    assert not any(p is not None and p.exists() for p in paths[:5]), "evicted files removed"


def test_a_hit_makes_a_blob_recently_used(store: BlobStore) -> None:
    if not store.caching:
        return
    digests = [_put(store, seed=i) for i in range(9)]
    assert store.path_of(digests[0]) is not None  # touch the oldest
    _put(store, seed=100)
    assert store.path_of(digests[0]) is not None
    assert store.path_of(digests[1]) is None


def test_pinned_blobs_are_never_evicted(store: BlobStore) -> None:
    if not store.caching:
        return
    digests = [_put(store, seed=i) for i in range(9)]
    for digest in digests[:3]:
        store.pin(digest)
    _put(store, seed=100)
    assert _kept(store, digests[:3]) == [True] * 3, "pinned blobs survived"
    assert _kept(store, digests[3:5]) == [False] * 2, "the next least recently used went"
    for digest in digests[:3]:
        store.unpin(digest)
    # Once unpinned, they are ordinary LRU candidates again.
    for seed in range(200, 206):
        _put(store, seed=seed)
    assert store.path_of(digests[0]) is None


def test_pins_count_and_one_unpin_too_many_is_harmless(store: BlobStore) -> None:
    data, digest = blob_of(BLOB, seed=4)
    store.pin(digest)
    store.pin(digest)
    store.unpin(digest)
    if not store.caching:
        store.unpin(digest)
        store.unpin(digest)
        return
    _commit(store, data, digest)  # the least recently used from here on
    for seed in range(300, 318):
        _put(store, seed=seed)
    assert store.path_of(digest) is not None, "still pinned once after two pins, one unpin"
    store.unpin(digest)
    store.unpin(digest)  # one too many: must leave no debt behind
    store.pin(digest)
    for seed in range(400, 410):
        _put(store, seed=seed)
    assert store.path_of(digest) is not None, "a pin after an extra unpin still protects"
    store.unpin(digest)
    for seed in range(500, 510):
        _put(store, seed=seed)
    assert store.path_of(digest) is None, "unpinned: evicted like any other"


def test_everything_pinned_means_nothing_evicted(store: BlobStore) -> None:
    if not store.caching:
        return
    digests = [_put(store, seed=i) for i in range(9)]
    for digest in digests:
        store.pin(digest)
    assert store.make_room(BLOB) is True  # over high, but nothing may go
    assert all(_kept(store, digests))


def test_make_room_refuses_a_blob_over_the_budget_and_evicts_nothing(store: BlobStore) -> None:
    if not store.caching:
        assert store.make_room(1) is False
        store.release(1)
        return
    kept = _put(store, seed=1)
    assert store.make_room(LIMITS.max_bytes) is False, "a blob over the budget is not kept"
    assert store.path_of(kept) is not None, "nothing evicted for a blob that cannot fit"


def test_reservations_count_against_the_budget_until_released(store: BlobStore) -> None:
    if not store.caching:
        return
    digests = [_put(store, seed=i) for i in range(5)]  # 500 KiB
    assert store.make_room(3 * BLOB) is True  # 800 KiB with the reservation: fits
    assert all(_kept(store, digests))
    # A second concurrent fill sees the first one's reservation: 1100 KiB > high.
    assert store.make_room(3 * BLOB) is True
    assert not all(_kept(store, digests)), "room was made ahead of both fills"
    store.release(3 * BLOB)
    store.release(3 * BLOB)
    # Released: 800 KiB of new blobs fit under the high mark without any eviction.
    survivors = [d for d in digests if store.path_of(d) is not None]
    fresh = [_put(store, seed=50 + i) for i in range(8 - len(survivors))]
    assert all(_kept(store, survivors + fresh)), "a released reservation still counted"


def test_make_room_for_an_unknown_size_reserves_nothing(store: BlobStore) -> None:
    if not store.caching:
        assert store.make_room(None) is False
        return
    assert store.make_room(None) is True
    store.release(None)
    digests = [_put(store, seed=i) for i in range(9)]
    assert all(_kept(store, digests))


def test_a_fill_lease_is_granted_released_and_granted_again(store: BlobStore) -> None:
    """One process alone on a store always gets the lease (another process's fill is
    the disk store's business, tested beside it)."""
    _, digest = blob_of(1000, seed=30)
    lease = store.claim_fill(digest)
    assert lease is not None
    if store.caching:
        lease.publish(store.new_ingest(digest), 1000)
    lease.release()
    lease.release()  # idempotent
    again = store.claim_fill(digest)
    assert again is not None
    again.release()


def test_disk_layout_is_blobs_sha256_hex(tmp_path: Path) -> None:
    store = DiskBlobStore(root=tmp_path, limits=LIMITS)
    store.recover()
    data, digest = blob_of(5000, seed=9)
    final = _commit(store, data, digest)
    assert final == tmp_path / "blobs" / "sha256" / digest.hex
    assert os.listdir(store.ingest_dir) == []


def test_memory_store_keeps_blobs_in_a_private_directory_removed_on_close(
    tmp_path: Path,
) -> None:
    first = MemoryBlobStore(limits=LIMITS, parent=tmp_path)
    second = MemoryBlobStore(limits=LIMITS, parent=tmp_path)
    data, digest = blob_of(5000, seed=10)
    final = _commit(first, data, digest)
    assert final.is_relative_to(first.root) and final.read_bytes() == data
    assert second.path_of(digest) is None, "two memory stores share nothing"
    first.close()
    assert not first.root.exists()
    assert first.path_of(digest) is None
    assert second.root.exists()
    second.close()
