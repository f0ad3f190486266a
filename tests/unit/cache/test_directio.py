"""Big blobs bypass the page cache: O_DIRECT ingest writes through an aligned staging
buffer, the lead reader fed from memory, and O_DIRECT reads for cold hits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import proxy.pipeline.fills as fill_module
from proxy.cache import directio
from proxy.cache.directio import DirectReader, IngestWriter, open_ingest, resident
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.metrics import Metrics
from proxy.oci.ranges import ByteRange
from proxy.pipeline.fills import HOLD_BACK, FillReader, FillTable

from .fakes import FakeUpstream, HashSink, blob_of

MIB = 1024 * 1024


def _write_at(fd: int, piece: memoryview, offset: int) -> None:
    while piece:
        count = os.pwrite(fd, piece, offset)
        piece, offset = piece[count:], offset + count


def _direct_supported(directory: Path) -> bool:
    fd, direct = open_ingest(str(directory / "probe"), direct=True)
    os.close(fd)
    os.unlink(directory / "probe")
    return direct


@pytest.mark.parametrize("size", [0, 4095, directio.STAGE, 2 * directio.STAGE + 12345])
def test_ingest_writer_writes_every_byte_with_an_unaligned_tail(tmp_path: Path, size: int) -> None:
    data, _ = blob_of(size, seed=size % 97)
    fd, direct = open_ingest(str(tmp_path / "ingest"), direct=True)
    writer = IngestWriter(fd, direct=direct, write_at=_write_at)
    seen = []
    view = memoryview(data)
    # Pieces of odd sizes, as sockets deliver them.
    for start in range(0, size, 300_001):
        seen.append(writer.write(view[start : start + 300_001]))
    assert all(0 <= n <= size for n in seen) and seen == sorted(seen)
    if direct:
        assert all(n % directio.ALIGN == 0 for n in seen), "O_DIRECT writes whole blocks"
    assert writer.finish() == size
    assert writer.direct_bytes == (size - size % directio.ALIGN if direct else 0)
    writer.close()
    os.close(fd)
    assert (tmp_path / "ingest").read_bytes() == data


def test_direct_reader_sends_exactly_the_range(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path}'s filesystem")
    data, _ = blob_of(2 * directio.STAGE + 5000, seed=3)
    path = tmp_path / "blob"
    path.write_bytes(data)
    cases = ((0, len(data)), (1, 10), (4097, directio.STAGE + 3), (len(data) - 7, 7))
    with ThreadPoolExecutor(2) as helpers:
        for start, count in cases:
            got = bytearray()
            reader = DirectReader(str(path), start, count, helpers=helpers)
            try:
                reader.send(got.extend)
            finally:
                reader.close()
            assert bytes(got) == data[start : start + count], (start, count)


def test_resident_tells_a_file_written_around_the_page_cache(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path}'s filesystem")
    data, _ = blob_of(4 * MIB, seed=4)
    cached = tmp_path / "cached"
    cached.write_bytes(data)
    fd = os.open(cached, os.O_RDONLY)
    try:
        assert resident(fd, len(data))
    finally:
        os.close(fd)
    fd, direct = open_ingest(str(tmp_path / "direct"), direct=True)
    writer = IngestWriter(fd, direct=direct, write_at=_write_at)
    writer.write(memoryview(data))
    writer.finish()
    writer.close()
    os.close(fd)
    # Every byte went around the page cache, by the writer's own account.
    assert writer.direct_bytes == len(data)
    fd = os.open(tmp_path / "direct", os.O_RDONLY)
    try:
        # Whether the kernel keeps pages of a direct write is its business (under load
        # ext4 sometimes does): drop whatever it kept, then the probe must see none.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not resident(fd, len(data))
        assert os.pread(fd, 4096, 0) == data[:4096]  # the bytes are all there
    finally:
        os.close(fd)


@pytest.fixture
async def big_fill_table(
    tmp_path: Path,
) -> AsyncIterator[tuple[FillTable, DiskBlobStore, ThreadPoolExecutor]]:
    store = DiskBlobStore(root=tmp_path, limits=CacheLimits(max_bytes=1024**3, min_free_bytes=0))
    store.recover()
    pool = ThreadPoolExecutor(4)
    # Every blob counts as big, so small test blobs take the O_DIRECT path.
    table = FillTable(
        store=store,
        pool=pool,
        metrics=Metrics(),
        complete_on_disconnect=False,
        direct_min_bytes=1,
    )
    yield table, store, pool
    await table.close()
    pool.shutdown(wait=True)


async def test_a_big_fill_feeds_its_lead_from_memory_and_holds_back_the_tail(
    big_fill_table: tuple[FillTable, DiskBlobStore, ThreadPoolExecutor],
) -> None:
    table, store, pool = big_fill_table
    data, digest = blob_of(3 * directio.STAGE + 2 * MIB, seed=5)
    # Everything but the last 64 KiB arrives; the fill cannot verify yet.
    upstream = FakeUpstream(data, chunk=64 * 1024, hold_after=len(data) - 64 * 1024)
    fill = table.get_or_start(digest, "registry.test", upstream.open)
    lead = FillReader(fill=fill, table=table, byte_range=None, pool=pool)
    await fill.wait_started()
    lead.size = fill.size
    sink = HashSink()
    task = asyncio.create_task(lead.send_to(sink))
    async with asyncio.timeout(10):
        while sink.count < len(data) - HOLD_BACK:  # noqa: ASYNC110 - polling the sink
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert sink.count == len(data) - HOLD_BACK, "the lead gets all but the held-back tail"
    # The file holds whole staging buffers only: the lead was fed from memory.
    assert fill.written == 3 * directio.STAGE < sink.count
    # A reader joining now tails the file, under the same rule.
    joiner = FillReader(fill=fill, table=table, byte_range=ByteRange(10, len(data) - 1), pool=pool)
    joiner.size = fill.size
    joined = HashSink()
    joiner_task = asyncio.create_task(joiner.send_to(joined))
    assert fill.state == "running" and store.path_of(digest) is None
    upstream.release.set()
    await asyncio.gather(task, joiner_task)
    assert sink.count == len(data) and sink.digest == str(digest)
    assert joined.count == len(data) - 10
    path = store.path_of(digest)
    assert path is not None and path.read_bytes() == data


async def test_a_big_fill_refuses_wrong_bytes_and_keeps_the_lead_short(
    big_fill_table: tuple[FillTable, DiskBlobStore, ThreadPoolExecutor],
) -> None:
    table, store, pool = big_fill_table
    data, digest = blob_of(directio.STAGE + 4096, seed=6)
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0x01
    fill = table.get_or_start(digest, "registry.test", FakeUpstream(bytes(tampered)).open)
    lead = FillReader(fill=fill, table=table, byte_range=None, pool=pool)
    await fill.wait_started()
    lead.size = fill.size
    sink = HashSink()
    with pytest.raises(fill_module.FillFailed, match="hash to"):
        await lead.send_to(sink)
    assert sink.count <= len(data) - HOLD_BACK
    assert os.listdir(store.blob_dir) == [] and os.listdir(store.ingest_dir) == []


async def test_a_big_fill_survives_its_lead_hanging_up(
    big_fill_table: tuple[FillTable, DiskBlobStore, ThreadPoolExecutor],
) -> None:
    table, store, pool = big_fill_table
    data, digest = blob_of(2 * directio.STAGE, seed=7)
    fill = table.get_or_start(digest, "registry.test", FakeUpstream(data).open)
    lead = FillReader(fill=fill, table=table, byte_range=None, pool=pool)
    other = FillReader(fill=fill, table=table, byte_range=None, pool=pool)
    await fill.wait_started()
    lead.size = other.size = fill.size
    gone, full = HashSink(hang_up_after=MIB), HashSink()
    results = await asyncio.gather(lead.send_to(gone), other.send_to(full), return_exceptions=True)
    assert isinstance(results[0], ConnectionError)
    assert results[1] is None and full.digest == str(digest)
    assert store.path_of(digest) is not None
