"""DiskBlobStore: startup recovery, LRU eviction under watermarks and a disk floor,
pins, quarantine. (What every BlobStore must do is in test_store_conformance.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.oci.digest import Digest

from .fakes import blob_of

KIB = 1024


def _store(root: Path, **limits: float) -> DiskBlobStore:
    store = DiskBlobStore(root=root, limits=CacheLimits(**limits))  # type: ignore[arg-type]
    store.recover()
    return store


def _put(store: DiskBlobStore, size: int, seed: int) -> Digest:
    data, digest = blob_of(size, seed)
    ingest = store.new_ingest(digest)
    ingest.write_bytes(data)
    store.commit(digest, ingest, size)
    return digest


# -- recovery ----------------------------------------------------------------------


def test_recover_removes_leftover_ingest_and_rebuilds_the_index(tmp_path: Path) -> None:
    first = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    kept = [_put(first, 1000 * (i + 1), seed=i) for i in range(3)]
    # A download that was in progress when the process died:
    _, partial = blob_of(50_000, seed=99)
    (first.ingest_dir / f"{partial.hex}.abc123").write_bytes(b"half a blob")
    (first.ingest_dir / "m-manifest.tmp").write_bytes(b"{")
    # A stray name that is not a digest (never servable):
    (first.blob_dir / "not-a-digest").write_bytes(b"junk")

    second = DiskBlobStore(root=tmp_path, limits=first.limits)
    report = second.recover()

    assert report.ingest_removed == 2
    assert os.listdir(second.ingest_dir) == []
    assert report.blobs == 3 and len(second) == 3
    assert report.bytes == second.total_bytes == 1000 + 2000 + 3000
    assert all(second.path_of(d) is not None for d in kept)
    assert second.path_of(partial) is None
    assert not (second.blob_dir / "not-a-digest").exists()


def test_recover_orders_the_lru_by_last_access(tmp_path: Path) -> None:
    first = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    a, b, c = (_put(first, 1000, seed=i) for i in range(3))
    now = time.time()
    for age, digest in ((300, b), (200, c), (100, a)):
        path = first.blob_dir / digest.hex
        os.utime(path, (now - age, now - age))
    second = DiskBlobStore(root=tmp_path, limits=first.limits)
    second.recover()
    assert list(second.digests()) == [b, c, a]


def test_recover_with_100k_blobs(tmp_path: Path) -> None:
    count = 100_000
    blob_dir = tmp_path / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    started = time.perf_counter()
    for i in range(count):
        # Empty files: recovery lists and stats, it does not hash (the scrub does).
        fd = os.open(blob_dir / f"{i:064x}", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    created = time.perf_counter() - started
    store = DiskBlobStore(root=tmp_path, limits=CacheLimits(min_free_bytes=0))
    report = store.recover()
    print(f"\ncreated {count} blob files in {created:.2f}s; recovery took {report.seconds:.3f}s")
    assert report.blobs == count == len(store)
    assert store.path_of(Digest("sha256", f"{count - 1:064x}")) is not None


# -- eviction ----------------------------------------------------------------------


def test_eviction_starts_at_high_watermark_and_stops_at_low(tmp_path: Path) -> None:
    store = _store(
        tmp_path, max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5, min_free_bytes=0
    )
    digests = [_put(store, 10 * KIB, seed=i) for i in range(9)]  # 90 KiB: at high, not over
    assert store.evicted == 0 and store.total_bytes == 90 * KIB
    newest = _put(store, 10 * KIB, seed=100)  # 100 KiB > 90 KiB: evict down to <= 50 KiB
    assert store.total_bytes <= 50 * KIB
    assert store.evicted == 5
    # Least recently used went first; the newest stayed.
    assert all(store.path_of(d) is None for d in digests[:5])
    assert all(store.path_of(d) is not None for d in digests[5:])
    assert store.path_of(newest) is not None
    assert not any((store.blob_dir / d.hex).exists() for d in digests[:5])


def test_a_hit_makes_a_blob_recently_used(tmp_path: Path) -> None:
    store = _store(
        tmp_path, max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5, min_free_bytes=0
    )
    digests = [_put(store, 10 * KIB, seed=i) for i in range(9)]
    assert store.path_of(digests[0]) is not None  # touch the oldest
    _put(store, 10 * KIB, seed=100)
    assert store.path_of(digests[0]) is not None
    assert store.path_of(digests[1]) is None


def test_pinned_blobs_are_never_evicted(tmp_path: Path) -> None:
    store = _store(
        tmp_path, max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5, min_free_bytes=0
    )
    digests = [_put(store, 10 * KIB, seed=i) for i in range(9)]
    for digest in digests[:3]:
        store.pin(digest)
    _put(store, 10 * KIB, seed=100)
    assert all(store.path_of(d) is not None for d in digests[:3]), "pinned blobs survived"
    assert all((store.blob_dir / d.hex).exists() for d in digests[:3])
    assert store.total_bytes <= 50 * KIB
    assert store.path_of(digests[3]) is None
    for digest in digests[:3]:
        store.unpin(digest)
    # Once unpinned, they are ordinary LRU candidates again.
    for seed in range(200, 206):
        _put(store, 10 * KIB, seed=seed)
    assert store.path_of(digests[0]) is None


def test_everything_pinned_means_nothing_evicted(tmp_path: Path) -> None:
    store = _store(
        tmp_path, max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5, min_free_bytes=0
    )
    digests = [_put(store, 10 * KIB, seed=i) for i in range(9)]
    for digest in digests:
        store.pin(digest)
    assert store.make_room(10 * KIB) is True  # over high, but nothing may go
    assert store.evicted == 0
    assert all(store.path_of(d) is not None for d in digests)


def test_free_disk_floor_evicts_even_under_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(
        tmp_path, max_bytes=1024**3, high_watermark=0.9, low_watermark=0.5, min_free_bytes=30 * KIB
    )
    disk_size = 100 * KIB  # a pretend disk that only this cache uses
    monkeypatch.setattr(store, "_free_bytes", lambda: disk_size - store.total_bytes)
    digests = [_put(store, 10 * KIB, seed=i) for i in range(7)]  # 70 KiB used, 30 free
    assert store.evicted == 0
    _put(store, 10 * KIB, seed=100)  # 20 KiB free < 30 KiB floor
    assert disk_size - store.total_bytes >= 30 * KIB
    assert store.path_of(digests[0]) is None
    assert store.total_bytes < 1024**3 * 0.5, "the budget alone would not have evicted"


def test_make_room_evicts_ahead_of_a_fill_and_counts_fills_in_progress(tmp_path: Path) -> None:
    store = _store(
        tmp_path, max_bytes=100 * KIB, high_watermark=1.0, low_watermark=0.5, min_free_bytes=0
    )
    digests = [_put(store, 10 * KIB, seed=i) for i in range(8)]  # 80 KiB
    assert store.make_room(30 * KIB) is True  # 110 KiB would not fit: evict first
    assert store.total_bytes + store.reserved_bytes <= 50 * KIB
    assert store.path_of(digests[0]) is None
    # A second concurrent fill sees the first one's reservation.
    before = store.total_bytes
    assert store.make_room(30 * KIB) is True
    assert store.total_bytes + store.reserved_bytes <= 100 * KIB
    assert store.total_bytes <= before
    store.release(30 * KIB)
    store.release(30 * KIB)
    assert store.reserved_bytes == 0


def test_refuses_room_for_a_blob_bigger_than_the_budget(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=100 * KIB, min_free_bytes=0)
    kept = _put(store, 10 * KIB, seed=1)
    assert store.make_room(200 * KIB) is False
    assert store.path_of(kept) is not None, "nothing evicted for a blob that cannot fit"


def test_refuses_room_under_the_disk_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, max_bytes=1024**3, min_free_bytes=10 * KIB)
    monkeypatch.setattr(store, "_free_bytes", lambda: 15 * KIB)
    assert store.make_room(4 * KIB) is True
    store.release(4 * KIB)
    assert store.make_room(8 * KIB) is False
    assert store.reserved_bytes == 0


# -- what the scrub and the metrics read --------------------------------------------


def test_pin_and_unpin_balance(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    _, digest = blob_of(1000, seed=4)
    store.pin(digest)
    store.pin(digest)
    store.unpin(digest)
    assert store.is_pinned(digest)
    store.unpin(digest)
    store.unpin(digest)  # one too many is harmless
    assert not store.is_pinned(digest)


def test_make_room_reserves_and_release_returns_it(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=64 * 1024**2, min_free_bytes=0)
    assert store.make_room(1000) is True
    assert store.reserved_bytes == 1000
    store.release(1000)
    assert store.reserved_bytes == 0
    assert store.make_room(store.limits.max_bytes) is False, "a blob over the budget is not kept"
    assert store.reserved_bytes == 0


def test_ingest_files_live_in_the_ingest_dir(tmp_path: Path) -> None:
    store = _store(tmp_path, min_free_bytes=0)
    _, digest = blob_of(10, seed=3)
    assert store.new_ingest(digest).parent == store.ingest_dir != store.blob_dir


# -- quarantine --------------------------------------------------------------------


def test_quarantine_takes_a_blob_out_of_service(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    digest = _put(store, 4096, seed=5)
    assert store.quarantine(digest, "test") is True
    assert store.path_of(digest) is None
    assert not (store.blob_dir / digest.hex).exists()
    assert store.total_bytes == 0 and store.quarantined == 1
    moved = os.listdir(store.quarantine_dir)
    assert len(moved) == 1 and moved[0].startswith(digest.hex)
    # Counted once, even if asked twice; and a restart does not bring it back.
    assert store.quarantine(digest, "again") is False
    assert store.quarantined == 1
    again = DiskBlobStore(root=tmp_path, limits=store.limits)
    again.recover()
    assert again.path_of(digest) is None


# -- several processes on one directory (two stores here: flocks exclude alike) ----


def test_a_fill_lease_excludes_every_other_store_on_the_directory(tmp_path: Path) -> None:
    first = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    second = DiskBlobStore(root=tmp_path, limits=first.limits)
    _, digest = blob_of(1000, seed=40)
    lease = first.claim_fill(digest)
    assert lease is not None
    assert second.claim_fill(digest) is None, "another store fills it: follow"
    ingest = first.new_ingest(digest)
    lease.publish(ingest, 1000)
    info = second.fill_files(digest).read_info()
    assert info is not None and (info.ingest_path, info.size) == (ingest, 1000)
    lease.release()
    assert os.listdir(first.ingest_dir) == [], "the lock and info files go with the lease"
    again = second.claim_fill(digest)
    assert again is not None
    again.release()


def test_a_commit_and_a_quarantine_elsewhere_are_seen_on_the_next_lookup(tmp_path: Path) -> None:
    first = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    second = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    digest = _put(first, 4096, seed=41)
    assert second.path_of(digest) is not None and len(second) == 1, "adopted"
    assert second.total_bytes == first.total_bytes == 4096, "one shared account"
    assert first.quarantine(digest, "test")
    assert second.path_of(digest) is None and len(second) == 0
    assert second.total_bytes == 0


def test_recover_keeps_a_fill_another_store_holds(tmp_path: Path) -> None:
    first = _store(tmp_path, max_bytes=10 * 1024**2, min_free_bytes=0)
    _, digest = blob_of(1000, seed=42)
    lease = first.claim_fill(digest)
    assert lease is not None
    ingest = first.new_ingest(digest)
    ingest.write_bytes(b"half")
    lease.publish(ingest, 1000)
    first.make_room(1000)
    restarted = DiskBlobStore(root=tmp_path, limits=first.limits)
    assert restarted.recover().ingest_removed == 0
    assert ingest.exists()
    assert restarted.reserved_bytes == 1000, "the live fill's reservation is counted"
    lease.release()
