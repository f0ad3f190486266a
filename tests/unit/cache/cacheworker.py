"""A cache worker process for the multi-process cache tests.

One ``DiskBlobStore`` + ``FillTable`` on a cache directory shared with other workers,
pulling blobs from the test's upstream over HTTP, like one ``pullgate serve`` worker.
Driven by JSON lines on stdin (one command each, run concurrently); answers JSON
lines on stdout tagged with the command's ``id``::

    python -m tests.unit.cache.cacheworker <cache-dir> <upstream-url> <limits-json>
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.cache.scrub import scrub_once
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamError
from proxy.pipeline.fills import Fill, FillReader, FillTable
from proxy.upstream.client import UpstreamResponse

from .fakes import HashSink


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class ProgressSink(HashSink):
    """A hashing sink that says once when it has received ``report_after`` bytes."""

    def __init__(self, on_progress: Callable[[], None] | None, report_after: int) -> None:
        super().__init__()
        self._on_progress = on_progress
        self._report_after = report_after

    def _take(self, data: bytes) -> None:
        super()._take(data)
        if self._on_progress is not None and self.count >= self._report_after:
            self._on_progress()
            self._on_progress = None


class Worker:
    def __init__(self, root: Path, upstream_url: str, limits: CacheLimits) -> None:
        self.store = DiskBlobStore(root=root, limits=limits)
        self.report = self.store.recover()
        self.upstream_url = upstream_url
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.table = FillTable(
            store=self.store, pool=self.pool, metrics=Metrics(), complete_on_disconnect=False
        )
        self.session = aiohttp.ClientSession(auto_decompress=False)

    async def close(self) -> None:
        await self.table.close()
        await self.session.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def opener(self, name: str) -> Callable[[], Awaitable[UpstreamResponse]]:
        async def open_response() -> UpstreamResponse:
            response = await self.session.get(f"{self.upstream_url}/blobs/{name}")
            if response.status != 200:
                response.release()
                raise UpstreamError(f"test upstream answered {response.status}")
            return UpstreamResponse(response)

        return open_response

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        digest = Digest.parse(command["digest"]) if "digest" in command else None
        if op == "pull":
            assert digest is not None
            return await self.pull(command, digest)
        if op == "path_of":
            assert digest is not None
            path = self.store.path_of(digest)
            return {"path": None if path is None else str(path)}
        if op == "pin":
            assert digest is not None
            self.store.pin(digest)
            return {}
        if op == "unpin":
            assert digest is not None
            self.store.unpin(digest)
            return {}
        if op == "usage":
            return {
                "total": self.store.total_bytes,
                "reserved": self.store.reserved_bytes,
                "known": len(self.store),
            }
        if op == "scrub":
            report = await scrub_once(
                self.store,
                metrics=Metrics(),
                pool=self.pool,
                bytes_per_second=command["bytes_per_second"],
            )
            return dataclasses.asdict(report)
        raise ValueError(f"unknown op {op}")

    async def pull(self, command: dict[str, Any], digest: Digest) -> dict[str, Any]:
        """``readers`` concurrent requests for one blob, as the pipeline makes them: a
        stored file, or a reader of the (own or followed) fill. Says "started" once
        every reader has its size, "progress" per reader past ``report_after`` bytes."""
        ident = command["id"]
        opened = await asyncio.gather(
            *(self._open(digest, command["name"]) for _ in range(command["readers"])),
            return_exceptions=True,
        )
        emit(
            {
                "id": ident,
                "event": "started",
                "kinds": [o[0] if isinstance(o, tuple) else "error" for o in opened],
                "sizes": [o[1] if isinstance(o, tuple) else None for o in opened],
            }
        )
        report_after = command.get("report_after")

        async def send(index: int, item: tuple[str, int | None, Any] | BaseException) -> Any:
            if isinstance(item, BaseException):
                return {"ok": False, "error_type": type(item).__name__, "error": str(item)}

            def progress() -> None:
                emit({"id": ident, "event": "progress", "reader": index})

            sink = ProgressSink(progress if report_after else None, report_after or 0)
            kind, _, source = item
            try:
                if isinstance(source, FillReader):
                    await source.send_to(sink)
                else:
                    await self._send_stored(digest, source, sink)
            except Exception as exc:
                return {
                    "ok": False,
                    "kind": kind,
                    "count": sink.count,
                    "error_type": type(exc).__name__,
                    "error": str(exc),
                }
            return {"ok": True, "kind": kind, "count": sink.count, "digest": sink.digest}

        results = await asyncio.gather(*(send(i, o) for i, o in enumerate(opened)))
        return {"results": results}

    async def _open(self, digest: Digest, name: str) -> tuple[str, int | None, Any]:
        path = self.store.path_of(digest)
        if path is not None:
            return "stored", path.stat().st_size, path
        reader = await self.table.join(digest, "upstream.test", self.opener(name))
        fill = reader.fill
        kind = "fill" if isinstance(fill, Fill) else "follow"
        if fill.state == "committed" and fill.final_path is not None:
            reader.close()
            return f"{kind}-committed", fill.size, fill.final_path
        if fill.state == "failed":
            reader.close()
            raise RuntimeError(f"{kind} failed before it started: {fill.error}")
        return kind, reader.size, reader

    async def _send_stored(self, digest: Digest, path: Path, sink: HashSink) -> None:
        self.store.pin(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                await sink.sendfile(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        finally:
            self.store.unpin(digest)


async def main(argv: list[str]) -> None:
    root, upstream_url, limits_json = argv
    worker = Worker(Path(root), upstream_url, CacheLimits(**json.loads(limits_json)))
    removed = worker.report.ingest_removed
    emit({"id": 0, "event": "ready", "pid": os.getpid(), "ingest_removed": removed})
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    async def run(command: dict[str, Any]) -> None:
        try:
            answer = await worker.handle(command)
        except Exception as exc:
            answer = {"error_type": type(exc).__name__, "error": str(exc)}
        emit({"id": command["id"], "event": "done", **answer})

    while line := await stdin.readline():
        command = json.loads(line)
        if command["op"] == "exit":
            break
        task = asyncio.create_task(run(command))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
