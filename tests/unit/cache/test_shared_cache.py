"""Several processes on one cache directory (``pullgate serve --workers N``): one
upstream fill per blob across all of them, followers that never deliver a complete
wrong body, a filler's death, commits visible everywhere, eviction that spares what
another process reads, restarts that keep live fills, one scrubber at a time.

Each worker is a real process (``cacheworker``) with its own ``DiskBlobStore`` and
``FillTable``; the upstream is an aiohttp server on loopback in the test process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.pipeline.fills import HOLD_BACK

from .fakes import blob_of

MIB = 1024 * 1024
KIB = 1024
REPO = Path(__file__).resolve().parents[3]
# Every wait on a worker or the upstream is bounded by this (seconds).
WAIT = 60.0
LIMITS = {"max_bytes": 1024**3, "min_free_bytes": 0}


@dataclass
class UpstreamBlob:
    """One blob the test upstream serves. ``stall_after``: stop after that many bytes
    until ``resume`` is set."""

    body: bytes
    stall_after: int | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    gets: int = 0
    sent: int = 0


class Upstream:
    """Serves ``GET /blobs/<name>`` with Content-Length, in 64 KiB writes; counts GETs."""

    def __init__(self) -> None:
        self.blobs: dict[str, UpstreamBlob] = {}
        self.url = ""

    def add(self, name: str, body: bytes, *, stall_after: int | None = None) -> UpstreamBlob:
        blob = self.blobs[name] = UpstreamBlob(body, stall_after)
        return blob

    async def handle(self, request: web.Request) -> web.StreamResponse:
        blob = self.blobs[request.match_info["name"]]
        blob.gets += 1
        response = web.StreamResponse()
        response.content_length = len(blob.body)
        await response.prepare(request)
        offset = 0
        try:
            while offset < len(blob.body):
                if blob.stall_after is not None and offset >= blob.stall_after:
                    await blob.resume.wait()
                chunk = blob.body[offset : offset + 64 * KIB]
                await response.write(chunk)
                offset += len(chunk)
                blob.sent = max(blob.sent, offset)
            await response.write_eof()
        except ConnectionError:
            pass  # the worker died or hung up
        return response


class WorkerProcess:
    """A ``cacheworker`` subprocess and its JSON-lines conversation."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.ready: dict[str, Any] = {}
        self._queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._next_id = 1
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, root: Path, upstream: Upstream, **limits: Any) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.unit.cache.cacheworker",
            str(root),
            upstream.url,
            json.dumps({**LIMITS, **limits}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        worker = cls(process)
        worker.ready = await worker.next_event(0)
        assert worker.ready["event"] == "ready"
        return worker

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            self._queue(message["id"]).put_nowait(message)

    def _queue(self, ident: int) -> asyncio.Queue[dict[str, Any]]:
        return self._queues.setdefault(ident, asyncio.Queue())

    def send(self, op: str, **args: Any) -> int:
        ident, self._next_id = self._next_id, self._next_id + 1
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": ident, "op": op, **args}).encode() + b"\n")
        return ident

    async def next_event(self, ident: int) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            return await self._queue(ident).get()

    async def wait_for(self, ident: int, event: str) -> dict[str, Any]:
        while True:
            message = await self.next_event(ident)
            if message["event"] == event:
                return message

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.wait_for(self.send(op, **args), "done")

    async def kill(self) -> None:
        """SIGKILL, and wait until it is gone (and the kernel dropped its locks)."""
        os.kill(self.pid, signal.SIGKILL)
        async with asyncio.timeout(WAIT):
            await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                self.send("exit")
                async with asyncio.timeout(10):
                    await self.process.wait()
            except (TimeoutError, ConnectionError):
                self.process.kill()
                await self.process.wait()
        self._reading.cancel()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    served = Upstream()
    app = web.Application()
    app.router.add_get("/blobs/{name}", served.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    served.url = f"http://{host}:{port}"
    yield served
    for blob in served.blobs.values():
        blob.resume.set()
    await runner.cleanup()


WorkerFactory = Callable[..., Awaitable[WorkerProcess]]


@pytest.fixture
async def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
async def start_worker(cache_dir: Path, upstream: Upstream) -> AsyncIterator[WorkerFactory]:
    started: list[WorkerProcess] = []

    async def start(**limits: Any) -> WorkerProcess:
        worker = await WorkerProcess.start(cache_dir, upstream, **limits)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.stop()


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _flock_holders(path: Path) -> set[int]:
    """Pids holding an exclusive flock on ``path``, from /proc/locks (read only:
    probing by taking the lock would disturb the holder's next attempt)."""
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return set()
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            continue  # a waiter
        if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5].endswith(f":{inode}"):
            holders.add(int(fields[4]))
    return holders


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - polling another process's state
            await asyncio.sleep(0.01)


# -- single-flight across processes ---------------------------------------------------


async def test_32_readers_over_2_processes_make_one_upstream_get(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(8 * MIB, seed=1)
    blob = upstream.add("layer", data, stall_after=MIB)
    first, second = await start_worker(), await start_worker()
    pulls = []
    for worker in (first, second):
        ident = worker.send("pull", name="layer", digest=str(digest), readers=16)
        # Each process's readers start (and learn the size) while the fill is stalled.
        started = await worker.wait_for(ident, "started")
        pulls.append((worker, ident, started))
    assert pulls[0][2]["kinds"] == ["fill"] * 16
    assert pulls[1][2]["kinds"] == ["follow"] * 16, "the second process follows the first"
    assert all(s == len(data) for _, _, started in pulls for s in started["sizes"])
    blob.resume.set()
    results = [
        result
        for worker, ident, _ in pulls
        for result in (await worker.wait_for(ident, "done"))["results"]
    ]
    assert blob.gets == 1
    assert len(results) == 32
    assert all(r["ok"] and r["count"] == len(data) for r in results), results
    assert {r["digest"] for r in results} == {str(digest)}
    assert (cache_dir / "blobs" / "sha256" / digest.hex).read_bytes() == data
    assert _files(cache_dir / "ingest") == []


async def test_followers_never_get_a_complete_wrong_body(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(4 * MIB, seed=2)
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    blob = upstream.add("layer", bytes(tampered), stall_after=MIB)
    first, second = await start_worker(), await start_worker()
    lead = first.send("pull", name="layer", digest=str(digest), readers=2)
    assert (await first.wait_for(lead, "started"))["kinds"] == ["fill"] * 2
    follow = second.send("pull", name="layer", digest=str(digest), readers=2)
    assert (await second.wait_for(follow, "started"))["kinds"] == ["follow"] * 2
    blob.resume.set()
    results = [
        *(await first.wait_for(lead, "done"))["results"],
        *(await second.wait_for(follow, "done"))["results"],
    ]
    assert all(r["error_type"] == "FillFailed" for r in results), results
    assert all(r["count"] <= len(data) - HOLD_BACK for r in results)
    assert blob.gets == 1
    assert _files(cache_dir / "blobs" / "sha256") == []
    await _until(lambda: _files(cache_dir / "ingest") == [])


async def test_sigkill_of_the_filler_fails_followers_and_the_next_pull_fills_afresh(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(8 * MIB, seed=3)
    blob = upstream.add("layer", data, stall_after=3 * MIB)
    filler, survivor = await start_worker(), await start_worker()
    lead = filler.send("pull", name="layer", digest=str(digest), readers=2)
    await filler.wait_for(lead, "started")
    follow = survivor.send(
        "pull", name="layer", digest=str(digest), readers=4, report_after=2 * MIB
    )
    assert (await survivor.wait_for(follow, "started"))["kinds"] == ["follow"] * 4
    # Every follower is streaming the growing file before the filler dies.
    for _ in range(4):
        await survivor.wait_for(follow, "progress")
    await filler.kill()
    results = (await survivor.wait_for(follow, "done"))["results"]
    assert all(r["error_type"] == "FillFailed" for r in results), results
    assert all(2 * MIB <= r["count"] <= len(data) - HOLD_BACK for r in results)
    # The dead filler's files were removed, never committed.
    assert _files(cache_dir / "blobs" / "sha256") == []
    assert _files(cache_dir / "ingest") == []
    # The next request fills afresh, in the surviving process.
    blob.stall_after = None
    again = (await survivor.call("pull", name="layer", digest=str(digest), readers=2))["results"]
    assert [r["kind"] for r in again] == ["fill", "fill"]
    assert all(r["ok"] and r["digest"] == str(digest) for r in again), again
    assert blob.gets == 2
    assert (cache_dir / "blobs" / "sha256" / digest.hex).read_bytes() == data
    usage = await survivor.call("usage")
    assert usage["total"] == len(data)
    assert usage["reserved"] == 0, "the dead filler's reservation was given back"


# -- store consistency ----------------------------------------------------------------


async def test_a_commit_is_a_hit_everywhere_and_a_quarantine_a_miss_everywhere(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(2 * MIB, seed=4)
    blob = upstream.add("layer", data)
    first, second = await start_worker(), await start_worker()
    pulled = (await first.call("pull", name="layer", digest=str(digest), readers=1))["results"]
    assert pulled[0]["ok"] and pulled[0]["kind"] == "fill"
    assert (await second.call("path_of", digest=str(digest)))["path"] is not None
    hit = (await second.call("pull", name="layer", digest=str(digest), readers=3))["results"]
    assert [r["kind"] for r in hit] == ["stored"] * 3
    assert all(r["digest"] == str(digest) for r in hit)
    assert blob.gets == 1
    # The file rots on disk; the second process's scrub finds it.
    stored = cache_dir / "blobs" / "sha256" / digest.hex
    rotten = bytearray(stored.read_bytes())
    rotten[MIB] ^= 0x01
    stored.write_bytes(bytes(rotten))
    report = await second.call("scrub", bytes_per_second=0)
    assert report["checked"] == 1 and report["corrupt"] == 1
    # The first process committed it, and now misses it: it refills, verified.
    assert (await first.call("path_of", digest=str(digest)))["path"] is None
    refill = (await first.call("pull", name="layer", digest=str(digest), readers=1))["results"]
    assert refill[0]["kind"] == "fill" and refill[0]["digest"] == str(digest)
    assert blob.gets == 2
    assert stored.read_bytes() == data


async def test_eviction_in_one_process_spares_a_blob_another_reads(
    upstream: Upstream, start_worker: WorkerFactory
) -> None:
    limits = {"max_bytes": MIB, "high_watermark": 0.9, "low_watermark": 0.5}
    evictor, reader = await start_worker(**limits), await start_worker(**limits)
    blobs = {}
    for index, name in enumerate(["x", "y", "z1", "z2", "z3", "z4", "z5", "z6"]):
        data, digest = blob_of(200 * KIB, seed=100 + index)
        upstream.add(name, data)
        blobs[name] = str(digest)

    async def pull(name: str) -> None:
        results = (await evictor.call("pull", name=name, digest=blobs[name], readers=1))["results"]
        assert results[0]["ok"], results

    async def stored(worker: WorkerProcess, name: str) -> bool:
        return (await worker.call("path_of", digest=blobs[name]))["path"] is not None

    await pull("x")
    await pull("y")
    assert await stored(reader, "x")
    await reader.call("pin", digest=blobs["x"])  # as while sending it to a client
    for name in ("z1", "z2", "z3"):  # 1000 KiB > the high watermark: evict to <= 512 KiB
        await pull(name)
    assert await stored(reader, "x"), "pinned by the other process: skipped"
    assert not await stored(evictor, "y"), "the next least recently used went instead"
    assert (await evictor.call("usage"))["total"] == 2 * 200 * KIB
    read = (await reader.call("pull", name="x", digest=blobs["x"], readers=1))["results"]
    assert read[0]["kind"] == "stored" and read[0]["digest"] == blobs["x"]
    await reader.call("unpin", digest=blobs["x"])
    for name in ("z4", "z5", "z6"):
        await pull(name)
    assert not await stored(reader, "x"), "unpinned, it is an ordinary LRU candidate again"


async def test_a_restarting_process_keeps_a_live_fill_and_removes_a_dead_one(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(4 * MIB, seed=5)
    blob = upstream.add("layer", data, stall_after=MIB)
    filler = await start_worker()
    lead = filler.send("pull", name="layer", digest=str(digest), readers=1)
    await filler.wait_for(lead, "started")
    live = _files(cache_dir / "ingest")
    assert {f"{digest.hex}.lock", f"{digest.hex}.info"} < set(live) and len(live) == 3
    # What a filler killed mid-fill leaves behind (nobody holds its lock):
    _, dead = blob_of(1000, seed=6)
    ingest = cache_dir / "ingest"
    (ingest / f"{dead.hex}.lock").write_bytes(b"")
    info = {"ingest": f"{dead.hex}.0a0b", "size": 1000}
    (ingest / f"{dead.hex}.info").write_text(json.dumps(info))
    (ingest / f"{dead.hex}.0a0b").write_bytes(b"half a blob")

    restarted = await start_worker()
    assert restarted.ready["ingest_removed"] == 3
    assert _files(ingest) == live, "the live fill's files are all kept"
    usage = await restarted.call("usage")
    assert usage["reserved"] == len(data), "the live fill's reservation is counted"
    blob.resume.set()
    results = (await filler.wait_for(lead, "done"))["results"]
    assert results[0]["ok"] and results[0]["digest"] == str(digest)
    assert (await restarted.call("path_of", digest=str(digest)))["path"] is not None
    assert blob.gets == 1
    usage = await restarted.call("usage")
    assert (usage["total"], usage["reserved"], usage["known"]) == (len(data), 0, 1)


async def test_one_scrubber_at_a_time_and_a_dead_one_lets_the_next_in(
    upstream: Upstream, start_worker: WorkerFactory, cache_dir: Path
) -> None:
    data, digest = blob_of(2 * MIB, seed=7)
    upstream.add("layer", data)
    slow, other = await start_worker(), await start_worker()
    pulled = (await slow.call("pull", name="layer", digest=str(digest), readers=1))["results"]
    assert pulled[0]["ok"]
    # One byte per second: this pass holds the scrub lock until its process dies.
    slow.send("scrub", bytes_per_second=1)
    await _until(lambda: _flock_holders(cache_dir / "locks" / "scrub") == {slow.pid})
    skipped = await other.call("scrub", bytes_per_second=0)
    assert skipped["skipped"] is True and skipped["checked"] == 0
    await slow.kill()
    report = await other.call("scrub", bytes_per_second=0)
    assert report["skipped"] is False
    assert report["checked"] == 1 and report["corrupt"] == 0
