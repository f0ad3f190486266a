"""Fakes for cache tests: a scriptable upstream response and hashing sinks."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.oci.digest import Digest
from proxy.upstream.body import BodyReader, LoopBody


def blob_of(size: int, seed: int = 0) -> tuple[bytes, Digest]:
    """Deterministic bytes of ``size`` and their digest."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB pattern
    data = (block * (size // len(block) + 1))[:size]
    # Make every position differ a little so offset bugs show up in the hash.
    data = bytes(b ^ (i & 0xFF) for i, b in enumerate(data[:4096])) + data[4096:]
    return data, Digest.of(data)


class FakeResponse:
    """The subset of ``UpstreamResponse`` the pipeline and fills use."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self._upstream = upstream
        self.status = upstream.status
        self.headers: CIMultiDict[str] = CIMultiDict(upstream.headers)
        self.closed = False
        self.source = "origin"
        self.broken_reports: list[bool] = []  # ``truncated`` of each report_broken

    @property
    def content_length(self) -> int | None:
        if not self._upstream.announce_length:
            return None
        return len(self._upstream.body)

    async def iter_body(self) -> AsyncIterator[bytes]:
        up = self._upstream
        sent = 0
        while sent < len(up.body):
            if up.hold_after is not None and sent >= up.hold_after:
                await up.release.wait()
            if up.fail_after is not None and sent >= up.fail_after:
                raise aiohttp.ClientPayloadError("upstream connection broke")
            chunk = up.body[sent : sent + up.chunk]
            sent += len(chunk)
            up.sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    def body_reader(self) -> BodyReader:
        return LoopBody(self.iter_body(), asyncio.get_running_loop())

    async def read_capped(self, limit: int, *, what: str) -> bytes | None:
        body = self._upstream.body
        return None if len(body) > limit else body

    def report_broken(self, *, truncated: bool, slow: bool = False) -> None:
        self.broken_reports.append(truncated)

    def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class FakeUpstream:
    """Serves one body; counts opens. ``hold_after`` pauses the body after that many
    bytes until ``release`` is set; ``fail_after`` breaks it there."""

    def __init__(
        self,
        body: bytes,
        *,
        chunk: int = 256 * 1024,
        hold_after: int | None = None,
        fail_after: int | None = None,
        announce_length: bool = True,
        open_error: Exception | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = body
        self.chunk = chunk
        self.hold_after = hold_after
        self.fail_after = fail_after
        self.announce_length = announce_length
        self.open_error = open_error
        self.status = status
        self.headers = headers or {}
        self.release = asyncio.Event()
        self.opens = 0
        self.sent = 0
        self.responses: list[FakeResponse] = []

    async def open(self) -> Any:
        self.opens += 1
        await asyncio.sleep(0)
        if self.open_error is not None:
            raise self.open_error
        response = FakeResponse(self)
        self.responses.append(response)
        return response


class HashSink:
    """A ``BlobSink`` that hashes what it is sent (never keeps it); can hang up."""

    def __init__(self, *, hang_up_after: int | None = None, slow: bool = False) -> None:
        self.hasher = hashlib.sha256()
        self.count = 0
        self.hang_up_after = hang_up_after
        self.slow = slow

    async def thread_sender(self) -> Callable[[memoryview], None]:
        return lambda data: self._take(bytes(data))

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        while count > 0:
            data = os.pread(fd, min(count, 1024 * 1024), offset)
            if not data:
                raise ConnectionResetError("file ended early")
            self._take(data)
            offset += len(data)
            count -= len(data)
            await asyncio.sleep(0.001 if self.slow else 0)

    def _take(self, data: bytes) -> None:
        if self.hang_up_after is not None and self.count + len(data) > self.hang_up_after:
            raise ConnectionResetError("client went away")
        self.hasher.update(data)
        self.count += len(data)

    @property
    def digest(self) -> str:
        return f"sha256:{self.hasher.hexdigest()}"
