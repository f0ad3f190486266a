"""Following another process's fill, in one process: two stores on one directory.

flock locks belong to open file descriptions, so two ``DiskBlobStore`` instances on
one root exclude each other exactly like two processes do. The real multi-process
cases are in ``test_shared_cache``; these pin down the follower's rules one by one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.cache.ingest import DiskFillLease
from proxy.cache.memory import MemoryBlobStore
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.ranges import ByteRange
from proxy.pipeline.fills import HOLD_BACK, Fill, FillFailed, FillReader, FillTable
from proxy.pipeline.follow import Follow

from .fakes import FakeUpstream, HashSink, blob_of

MIB = 1024 * 1024


@pytest.fixture
def pool() -> ThreadPoolExecutor:
    executor = ThreadPoolExecutor(max_workers=4)
    yield executor  # type: ignore[misc]
    executor.shutdown(wait=True)


Node = tuple[DiskBlobStore, FillTable]


@pytest.fixture
async def make_node(tmp_path: Path, pool: ThreadPoolExecutor) -> AsyncIterator[Callable[[], Node]]:
    """A store and fill table on the shared cache dir: what one worker process has."""
    tables: list[FillTable] = []

    def make() -> Node:
        store = DiskBlobStore(
            root=tmp_path, limits=CacheLimits(max_bytes=1024**3, min_free_bytes=0)
        )
        store.recover()
        table = FillTable(store=store, pool=pool, metrics=Metrics(), complete_on_disconnect=False)
        tables.append(table)
        return store, table

    yield make
    for table in tables:
        await table.close()


async def _wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10.0):
        while not condition():  # noqa: ASYNC110 - polling the follower's state
            await asyncio.sleep(0.005)


def _die(lease: DiskFillLease) -> None:
    """What SIGKILL does to a filler: its lock is dropped, its files stay."""
    os.close(lease._lock_fd)
    lease._lock_fd = -1


async def test_a_second_store_follows_the_first_ones_fill(
    make_node: Callable[[], Node],
) -> None:
    data, digest = blob_of(3 * MIB, seed=1)
    (store_a, table_a), (_, table_b) = make_node(), make_node()
    upstream = FakeUpstream(data, hold_after=MIB)
    leader = await table_a.join(digest, "registry.test", upstream.open)
    follower = await table_b.join(digest, "registry.test", upstream.open)
    ranged = await table_b.join(digest, "registry.test", upstream.open)
    ranged.byte_range = ByteRange(MIB + 3, len(data) - 1)
    assert isinstance(leader.fill, Fill) and isinstance(follower.fill, Follow)
    assert ranged.fill is follower.fill, "one follower per process and digest"
    assert follower.size == len(data), "the size is known before the body"
    sinks = [HashSink() for _ in range(3)]
    upstream.release.set()
    await asyncio.gather(
        *(
            reader.send_to(sink)
            for reader, sink in zip((leader, follower, ranged), sinks, strict=True)
        )
    )
    assert upstream.opens == 1
    assert sinks[0].digest == sinks[1].digest == str(digest)
    assert sinks[2].digest == str(Digest.of(data[MIB + 3 :]))
    assert follower.fill.state == "committed"
    assert follower.fill.final_path == store_a.blob_dir / digest.hex


async def _follow_written_blob(
    make_node: Callable[[], Node], data: bytes, digest: Digest
) -> tuple[DiskBlobStore, DiskFillLease, Path, FillReader, HashSink, asyncio.Task[None]]:
    """Another store's fill has written every byte of the blob, but not committed it;
    a reader of ours follows it and has sent all it may."""
    (store_a, _), (_, table_b) = make_node(), make_node()
    lease = store_a.claim_fill(digest)
    assert lease is not None
    ingest = store_a.new_ingest(digest)
    ingest.write_bytes(data)
    lease.publish(ingest, len(data))
    reader = await table_b.join(digest, "registry.test", FakeUpstream(data).open)
    assert isinstance(reader.fill, Follow) and reader.size == len(data)
    sink = HashSink()
    task = asyncio.create_task(reader.send_to(sink))
    await _wait_for(lambda: sink.count >= len(data) - HOLD_BACK)
    await asyncio.sleep(0.05)  # several more polls
    return store_a, lease, ingest, reader, sink, task


async def test_follower_holds_back_the_tail_until_the_commit(
    make_node: Callable[[], Node],
) -> None:
    data, digest = blob_of(2 * MIB, seed=5)
    store_a, lease, ingest, reader, sink, task = await _follow_written_blob(make_node, data, digest)
    size = len(data)
    assert reader.fill.state == "running"
    assert sink.count == size - HOLD_BACK, "every byte is written, the tail waits"
    store_a.commit(digest, ingest, len(data))
    lease.release()
    await task
    assert sink.count == size and sink.digest == str(digest)
    assert reader.fill.state == "committed"


async def test_follower_of_a_filler_that_died_after_its_last_byte_fails(
    make_node: Callable[[], Node],
) -> None:
    data, digest = blob_of(2 * MIB, seed=6)
    store_a, lease, _, _, sink, task = await _follow_written_blob(make_node, data, digest)
    size = len(data)
    _die(lease)
    with pytest.raises(FillFailed):
        async with asyncio.timeout(10.0):  # the death is noticed, not waited out
            await task
    assert sink.count == size - HOLD_BACK, "never the complete body"
    assert store_a.path_of(digest) is None
    assert os.listdir(store_a.ingest_dir) == [], "its files removed, never committed"


async def test_follower_refuses_a_blob_committed_from_another_file(
    make_node: Callable[[], Node],
) -> None:
    """The filler died half-way; before the follower looked, another fill committed
    the blob. The follower sent the dead filler's bytes: it must not finish its body
    from there as if that commit were its fill's."""
    data, digest = blob_of(2 * MIB, seed=2)
    (store_a, _), (store_b, table_b) = make_node(), make_node()
    lease = store_a.claim_fill(digest)
    assert lease is not None
    dead_ingest = store_a.new_ingest(digest)
    dead_ingest.write_bytes(data[:MIB])
    lease.publish(dead_ingest, len(data))
    reader = await table_b.join(digest, "registry.test", FakeUpstream(data).open)
    follow = reader.fill
    assert isinstance(follow, Follow) and follow.state == "running"
    sink = HashSink()
    task = asyncio.create_task(reader.send_to(sink))
    await _wait_for(lambda: sink.count >= MIB - HOLD_BACK)
    _die(lease)
    other_ingest = store_a.new_ingest(digest)
    other_ingest.write_bytes(data)
    store_a.commit(digest, other_ingest, len(data))
    with pytest.raises(FillFailed):
        await task
    assert sink.count < len(data)
    assert follow.state == "failed"
    # The dead filler's files are gone; the other fill's verified blob stays.
    assert os.listdir(store_b.ingest_dir) == []
    assert (store_b.blob_dir / digest.hex).read_bytes() == data


async def test_a_filler_that_ended_before_starting_is_replaced_by_our_own_fill(
    make_node: Callable[[], Node],
) -> None:
    data, digest = blob_of(MIB, seed=3)
    (store_a, _), (store_b, table_b) = make_node(), make_node()
    lease = store_a.claim_fill(digest)  # e.g. its upstream is about to answer 503
    assert lease is not None
    upstream = FakeUpstream(data)
    joining = asyncio.create_task(table_b.join(digest, "registry.test", upstream.open))
    await _wait_for(lambda: len(table_b) == 1)
    lease.release()  # it gave up without publishing a fill
    reader = await joining
    assert isinstance(reader.fill, Fill), "this process fills it now"
    sink = HashSink()
    await reader.send_to(sink)
    assert sink.digest == str(digest) and upstream.opens == 1
    assert store_b.path_of(digest) is not None


async def test_a_dead_fillers_files_are_removed_by_the_next_fill(
    make_node: Callable[[], Node],
) -> None:
    data, digest = blob_of(MIB, seed=4)
    (store_a, _), (store_b, table_b) = make_node(), make_node()
    lease = store_a.claim_fill(digest)
    assert lease is not None
    dead_ingest = store_a.new_ingest(digest)
    dead_ingest.write_bytes(b"not the blob at all")
    lease.publish(dead_ingest, len(data))
    _die(lease)
    reader = await table_b.join(digest, "registry.test", FakeUpstream(data).open)
    assert isinstance(reader.fill, Fill)
    assert not dead_ingest.exists(), "removed when the lease was taken, never committed"
    sink = HashSink()
    await reader.send_to(sink)
    assert sink.digest == str(digest)
    assert (store_b.blob_dir / digest.hex).read_bytes() == data
    assert os.listdir(store_b.ingest_dir) == []


async def test_a_blob_stored_when_a_fill_would_start_is_handed_over_as_committed(
    pool: ThreadPoolExecutor,
) -> None:
    """Another process committed it between our lookup and our claim; a store no other
    process shares (memory) takes the same path."""
    data, digest = blob_of(1000, seed=7)
    store = MemoryBlobStore(limits=CacheLimits(max_bytes=1024**3, min_free_bytes=0))
    table = FillTable(store=store, pool=pool, metrics=Metrics(), complete_on_disconnect=False)
    try:
        ingest = store.new_ingest(digest)
        ingest.write_bytes(data)
        final = store.commit(digest, ingest, len(data))
        upstream = FakeUpstream(data)
        reader = await table.join(digest, "registry.test", upstream.open)
        assert reader.fill.state == "committed" and reader.fill.final_path == final
        assert reader.size == len(data) and upstream.opens == 0
        sink = HashSink()
        await reader.send_to(sink)
        assert sink.digest == str(digest)
    finally:
        await table.close()
        store.close()
