"""Single-flight fills: one upstream open per digest, shared by every reader, with
the tail held back until the digest matched and the blob was committed."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import proxy.pipeline.fills as fill_module
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.ranges import ByteRange
from proxy.pipeline.fills import HOLD_BACK, Fill, FillFailed, FillReader, FillTable

from .fakes import FakeUpstream, HashSink, blob_of

MIB = 1024 * 1024


@pytest.fixture
def pool() -> ThreadPoolExecutor:
    executor = ThreadPoolExecutor(max_workers=4)
    yield executor  # type: ignore[misc]
    executor.shutdown(wait=True)


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    disk = DiskBlobStore(root=tmp_path, limits=CacheLimits(max_bytes=1024**3, min_free_bytes=0))
    disk.recover()
    return disk


TableFactory = Callable[..., FillTable]


@pytest.fixture
async def make_table(store: DiskBlobStore, pool: ThreadPoolExecutor) -> AsyncIterator[TableFactory]:
    tables: list[FillTable] = []

    def make(complete_on_disconnect: bool = False) -> FillTable:
        table = FillTable(
            store=store,
            pool=pool,
            metrics=Metrics(),
            complete_on_disconnect=complete_on_disconnect,
        )
        tables.append(table)
        return table

    yield make
    for table in tables:
        await table.close()


async def _join(
    table: FillTable,
    digest: Digest,
    upstream: FakeUpstream,
    pool: ThreadPoolExecutor,
    byte_range: ByteRange | None = None,
) -> FillReader:
    """What the pipeline does for a cache miss: join or start the fill, wait for it."""
    fill = table.get_or_start(digest, "registry.test", upstream.open)
    reader = FillReader(fill=fill, table=table, byte_range=byte_range, pool=pool)
    await fill.wait_started()
    reader.size = fill.size
    return reader


async def _read(reader: FillReader, sink: HashSink) -> HashSink:
    await reader.send_to(sink)
    return sink


async def _wait_for(
    condition: Callable[[], bool], describe: Callable[[], str] | None = None
) -> None:
    """Poll ``condition`` (state of the fill under test) for at most 10 s; on a timeout,
    fail with ``describe()`` (the state that was reached instead)."""
    try:
        async with asyncio.timeout(10.0):
            while not condition():  # noqa: ASYNC110 - polling another object's state
                await asyncio.sleep(0.005)
    except TimeoutError:
        reached = describe() if describe is not None else "condition never held"
        raise AssertionError(f"timed out after 10 s: {reached}") from None


def _ingest_empty(store: DiskBlobStore) -> bool:
    return os.listdir(store.ingest_dir) == []


class WatchedSink(HashSink):
    """A ``HashSink`` that records, for every piece it takes, the total received so far
    and the state of the fill at that moment."""

    def __init__(self, fill: Fill) -> None:
        super().__init__()
        self._fill = fill
        self.arrivals: list[tuple[int, str]] = []

    def _take(self, data: bytes) -> None:
        super()._take(data)
        self.arrivals.append((self.count, self._fill.state))

    def received_before_commit(self) -> int:
        return max((n for n, state in self.arrivals if state != "committed"), default=0)


def _held_upstream(data: bytes) -> FakeUpstream:
    """An upstream that sends all but the last ``HOLD_BACK // 2`` bytes in one chunk,
    then waits for ``release``: the fill can write past the held-back boundary (a chunk
    this large is written at once) but cannot verify the digest yet."""
    first = len(data) - HOLD_BACK // 2
    return FakeUpstream(data, chunk=first, hold_after=first)


class FsyncGate:
    """Holds the fill's fsync (the step between a matching digest and the commit) until
    ``open()``: every byte is on disk, the digest is known, nothing is committed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            self.reached.set()
            if not self._open.wait(10.0):
                raise TimeoutError("the test never opened the fsync gate")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def open(self) -> None:
        self._open.set()


async def test_concurrent_readers_share_one_upstream_open(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(6 * MIB, seed=1)
    upstream = FakeUpstream(data)
    table = make_table()
    readers = [await _join(table, digest, upstream, pool) for _ in range(16)]
    sinks = await asyncio.gather(*(_read(r, HashSink()) for r in readers))
    assert upstream.opens == 1
    assert {s.digest for s in sinks} == {str(digest)}
    assert all(s.count == len(data) for s in sinks)
    path = store.path_of(digest)
    assert path is not None and path.read_bytes() == data
    assert _ingest_empty(store) and len(table) == 0


async def test_late_joiners_get_identical_bytes(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(8 * MIB, seed=2)
    upstream = FakeUpstream(data, hold_after=5 * MIB)
    table = make_table()
    early = await _join(table, digest, upstream, pool)
    early_task = asyncio.create_task(_read(early, HashSink()))
    fill = early.fill
    await _wait_for(lambda: fill.written >= 4 * MIB)
    late = [await _join(table, digest, upstream, pool) for _ in range(4)]
    assert all(r.fill is fill for r in late), "late joiners join the running fill"
    late_tasks = [asyncio.create_task(_read(r, HashSink())) for r in late]
    upstream.release.set()
    sinks = await asyncio.gather(early_task, *late_tasks)
    assert upstream.opens == 1
    assert {s.digest for s in sinks} == {str(digest)}


@pytest.mark.parametrize("announce_length", [True, False], ids=["known-size", "unknown-size"])
async def test_readers_hold_back_the_tail_until_commit(
    store: DiskBlobStore,
    make_table: TableFactory,
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
    announce_length: bool,
) -> None:
    """The rule of ``FillReader.send_to``: until the commit, a reader gets at most the
    fill's end (the blob size, or what is written when the size is unknown) minus
    ``HOLD_BACK``; the rest only after the commit."""
    data, digest = blob_of(3 * MIB, seed=3)
    upstream = _held_upstream(data)
    upstream.announce_length = announce_length
    gate = FsyncGate(monkeypatch)
    table = make_table()
    reader = await _join(table, digest, upstream, pool)
    fill = reader.fill
    sink = WatchedSink(fill)
    task = asyncio.create_task(_read(reader, sink))

    # 1. The upstream is held: the fill has written past the boundary, cannot verify.
    received = upstream.hold_after
    assert received is not None
    boundary = (len(data) if announce_length else received) - HOLD_BACK
    await _wait_for(
        lambda: fill.written == received and sink.count >= boundary,
        lambda: f"written {fill.written} of {received}, sent {sink.count} of {boundary}",
    )
    assert sink.count == boundary, "exactly the bytes before the held-back tail"
    assert fill.state == "running" and store.path_of(digest) is None

    # 2. Every byte is written and hashed; only the commit is missing.
    upstream.release.set()
    await _wait_for(
        lambda: gate.reached.is_set() and sink.count >= len(data) - HOLD_BACK,
        lambda: (
            f"fsync reached: {gate.reached.is_set()}, sent {sink.count} of {len(data) - HOLD_BACK}"
        ),
    )
    assert fill.written == len(data)
    assert sink.count == len(data) - HOLD_BACK, "the last HOLD_BACK bytes wait for the commit"
    assert fill.state == "running" and store.path_of(digest) is None

    # 3. The commit releases the tail.
    gate.open()
    async with asyncio.timeout(10.0):
        await task
    assert sink.count == len(data) and sink.digest == str(digest)
    assert fill.state == "committed" and store.path_of(digest) is not None
    assert sink.received_before_commit() == len(data) - HOLD_BACK, sink.arrivals


async def test_a_failing_fill_fails_every_joined_reader(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(6 * MIB, seed=4)
    upstream = FakeUpstream(data, fail_after=3 * MIB)
    table = make_table()
    readers = [await _join(table, digest, upstream, pool) for _ in range(8)]
    sinks = [HashSink() for _ in readers]
    results = await asyncio.gather(
        *(_read(r, s) for r, s in zip(readers, sinks, strict=True)), return_exceptions=True
    )
    assert all(isinstance(r, FillFailed) for r in results), results
    assert all(s.count < len(data) for s in sinks), "no reader got a complete body"
    assert store.path_of(digest) is None
    assert os.listdir(store.blob_dir) == [] and _ingest_empty(store)
    assert readers[0].fill.state == "failed"


async def test_refuses_to_commit_bytes_that_do_not_match_the_digest(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(3 * MIB, seed=5)
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    upstream = _held_upstream(bytes(tampered))
    table = make_table()
    readers = [await _join(table, digest, upstream, pool) for _ in range(3)]
    sinks = [HashSink() for _ in readers]
    tasks = [asyncio.create_task(_read(r, s)) for r, s in zip(readers, sinks, strict=True)]
    # Every reader has all it may have before the digest is known ...
    boundary = len(data) - HOLD_BACK
    fill = readers[0].fill
    await _wait_for(
        lambda: fill.written == upstream.hold_after and all(s.count >= boundary for s in sinks),
        lambda: (
            f"written {fill.written} of {upstream.hold_after}, "
            f"sent {[s.count for s in sinks]} of {boundary}"
        ),
    )
    assert [s.count for s in sinks] == [boundary] * len(sinks)
    # ... and not one byte more once the last byte is in and the digest does not match.
    upstream.release.set()
    async with asyncio.timeout(10.0):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, FillFailed) for r in results)
    assert all(s.count <= len(data) - HOLD_BACK for s in sinks)
    assert [s.count for s in sinks] == [boundary] * len(sinks), "no reader got the tail"
    assert os.listdir(store.blob_dir) == [] and _ingest_empty(store)


async def test_commit_happens_only_after_fsync_of_the_verified_file(
    store: DiskBlobStore,
    make_table: TableFactory,
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, digest = blob_of(2 * MIB, seed=6)
    events: list[str] = []
    real_fsync, real_commit = os.fsync, store.commit

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def commit(d: Digest, ingest: Path, size: int) -> Path:
        events.append("commit")
        assert ingest.parent == store.ingest_dir
        assert ingest.read_bytes() == data, "only complete, verified bytes are committed"
        return real_commit(d, ingest, size)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "commit", commit)
    table = make_table()
    reader = await _join(table, digest, FakeUpstream(data), pool)
    await _read(reader, HashSink())
    assert events.index("fsync") < events.index("commit")
    assert (store.blob_dir / digest.hex).read_bytes() == data


async def test_a_disconnecting_reader_does_not_cancel_the_fill(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(6 * MIB, seed=7)
    upstream = FakeUpstream(data)
    table = make_table()
    leaver = await _join(table, digest, upstream, pool)
    stayer = await _join(table, digest, upstream, pool)
    left = await asyncio.gather(_read(leaver, HashSink(hang_up_after=MIB)), return_exceptions=True)
    assert isinstance(left[0], ConnectionResetError)
    sink = await _read(stayer, HashSink())
    assert sink.digest == str(digest)
    assert upstream.opens == 1 and store.path_of(digest) is not None


async def test_a_fill_everyone_left_is_cancelled_and_cleaned_up(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(4 * MIB, seed=8)
    upstream = FakeUpstream(data, hold_after=2 * MIB)
    table = make_table(complete_on_disconnect=False)
    reader = await _join(table, digest, upstream, pool)
    fill = reader.fill
    result = await asyncio.gather(
        _read(reader, HashSink(hang_up_after=MIB)), return_exceptions=True
    )
    assert isinstance(result[0], ConnectionResetError)
    assert fill.task is not None
    await asyncio.gather(fill.task, return_exceptions=True)
    assert fill.state == "failed"
    assert store.path_of(digest) is None and _ingest_empty(store)
    assert upstream.responses[0].closed


async def test_complete_on_disconnect_finishes_the_fill_with_nobody_left(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(4 * MIB, seed=9)
    upstream = FakeUpstream(data, hold_after=2 * MIB)
    table = make_table(complete_on_disconnect=True)
    reader = await _join(table, digest, upstream, pool)
    fill = reader.fill
    await asyncio.gather(_read(reader, HashSink(hang_up_after=MIB)), return_exceptions=True)
    assert fill.readers == 0 and not fill.done
    upstream.release.set()
    assert fill.task is not None
    await fill.task
    assert fill.state == "committed"
    path = store.path_of(digest)
    assert path is not None and path.read_bytes() == data


async def test_ranged_reader_of_a_fill(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(3 * MIB, seed=10)
    table = make_table()
    byte_range = ByteRange(MIB + 7, 2 * MIB + 100)
    ranged = await _join(table, digest, FakeUpstream(data), pool, byte_range=byte_range)
    whole = await _join(table, digest, FakeUpstream(data), pool)
    ranged_sink, whole_sink = await asyncio.gather(
        _read(ranged, HashSink()), _read(whole, HashSink())
    )
    assert ranged_sink.count == byte_range.length
    assert ranged_sink.digest == str(Digest.of(data[MIB + 7 : 2 * MIB + 101]))
    assert whole_sink.digest == str(digest)


async def test_unknown_length_upstream_still_fills(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(3 * MIB + 17, seed=11)
    table = make_table()
    readers = [
        await _join(table, digest, FakeUpstream(data, announce_length=False), pool)
        for _ in range(3)
    ]
    sinks = await asyncio.gather(*(_read(r, HashSink()) for r in readers))
    assert {s.digest for s in sinks} == {str(digest)}
    assert store.path_of(digest) is not None


async def test_an_upstream_that_cannot_be_opened_fails_the_fill_cleanly(
    store: DiskBlobStore, make_table: TableFactory, pool: ThreadPoolExecutor
) -> None:
    data, digest = blob_of(1000, seed=12)
    upstream = FakeUpstream(data, open_error=UpstreamUnavailable("connection refused"))
    table = make_table()
    # Three requests arrive together: they share the one fill, and its failed open.
    readers = await asyncio.gather(*(_join(table, digest, upstream, pool) for _ in range(3)))
    fill = readers[0].fill
    assert all(r.fill is fill for r in readers)
    assert isinstance(fill.open_error, UpstreamUnavailable)
    results = await asyncio.gather(*(_read(r, HashSink()) for r in readers), return_exceptions=True)
    assert all(isinstance(r, FillFailed) for r in results)
    assert upstream.opens == 1 and _ingest_empty(store)


async def test_disk_full_fails_the_fill_and_degrades_to_uncached(
    store: DiskBlobStore,
    make_table: TableFactory,
    pool: ThreadPoolExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, digest = blob_of(6 * MIB, seed=13)
    real_write = fill_module._write_at
    calls = 0

    def write_then_fill_up(fd: int, piece: memoryview, offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, piece, offset)

    monkeypatch.setattr(fill_module, "_write_at", write_then_fill_up)
    table = make_table()
    reader = await _join(table, digest, FakeUpstream(data), pool)
    result = await asyncio.gather(_read(reader, HashSink()), return_exceptions=True)
    assert isinstance(result[0], FillFailed)
    assert reader.fill.disk_full and table.degraded
    assert os.listdir(store.blob_dir) == [] and _ingest_empty(store)
    assert store.reserved_bytes == 0


async def test_no_room_hands_the_open_response_to_a_reader(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    small = DiskBlobStore(root=tmp_path, limits=CacheLimits(max_bytes=MIB, min_free_bytes=0))
    small.recover()
    table = FillTable(store=small, pool=pool, metrics=Metrics(), complete_on_disconnect=False)
    data, digest = blob_of(2 * MIB, seed=14)
    upstream = FakeUpstream(data)
    fill: Fill = table.get_or_start(digest, "registry.test", upstream.open)
    fill.readers += 1
    await fill.wait_started()
    assert fill.no_room and fill.state == "failed" and not table.degraded
    response = fill.take_bypass()
    assert response is upstream.responses[0] and not response.closed
    assert fill.take_bypass() is None, "handed to one reader only"
    table.reader_left(fill)
    assert upstream.opens == 1 and os.listdir(small.ingest_dir) == []
    await table.close()


async def test_an_unclaimed_no_room_response_is_closed_when_readers_leave(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    small = DiskBlobStore(root=tmp_path, limits=CacheLimits(max_bytes=MIB, min_free_bytes=0))
    small.recover()
    table = FillTable(store=small, pool=pool, metrics=Metrics(), complete_on_disconnect=False)
    data, digest = blob_of(2 * MIB, seed=15)
    upstream = FakeUpstream(data)
    fill = table.get_or_start(digest, "registry.test", upstream.open)
    fill.readers += 1
    await fill.wait_started()
    table.reader_left(fill)
    assert upstream.responses[0].closed
    await table.close()
