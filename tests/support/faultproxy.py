"""A small fault-injecting HTTP proxy in front of a real registry, for faults a real
registry cannot produce: a flipped byte, a cut stream, a stall, a status, a slow drip,
a trickle of small pieces just inside a read timeout, a lying Content-Length, a body
without a length that runs past the blob.

It runs its own event loop in a thread, binds 127.0.0.1, and forwards everything else
to the target unchanged (headers included, so Content-Length still promises the
full body when the stream is cut).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.support.peers import free_port


@dataclass(frozen=True)
class Fault:
    kind: str  # corrupt | cut | stall | status | drip | trickle | length | overrun
    offset: int = 0
    seconds: float = 0.0
    status: int = 500
    retry_after: int | None = None
    times: int = 1_000_000
    bytes_per_second: int = 0
    # trickle: bytes per piece; length: added to the announced length; overrun: bytes
    # appended to a body sent without a length.
    amount: int = 0


def corrupt_byte(offset: int) -> Fault:
    return Fault("corrupt", offset=offset)


def cut_at(offset: int) -> Fault:
    return Fault("cut", offset=offset)


def stall(seconds: float, offset: int = 0) -> Fault:
    return Fault("stall", seconds=seconds, offset=offset)


def status(code: int, *, retry_after: int | None = None, times: int = 1) -> Fault:
    return Fault("status", status=code, retry_after=retry_after, times=times)


def drip(bytes_per_second: int) -> Fault:
    return Fault("drip", bytes_per_second=bytes_per_second)


def trickle(offset: int, *, piece: int, every: float) -> Fault:
    """Forward ``offset`` bytes at full speed, then ``piece`` bytes every ``every``
    seconds (at most ``TRICKLE_LIMIT`` seconds of it): each piece inside any read
    timeout, the whole far below any sane rate."""
    return Fault("trickle", offset=offset, amount=piece, seconds=every)


def lie_length(delta: int) -> Fault:
    """Announce a Content-Length ``delta`` bytes off the real one (the body is the
    real one, cut or padded to what was announced, and the connection closed)."""
    return Fault("length", amount=delta)


def overrun(extra: int) -> Fault:
    """Send the body chunked (no Content-Length) with ``extra`` bytes after it."""
    return Fault("overrun", amount=extra)


# The longest a trickle goes on (a test's bound, whatever the reader does).
TRICKLE_LIMIT = 60.0


class FaultProxy:
    def __init__(self, target_url: str) -> None:
        self.target_url = target_url.rstrip("/")
        self.port = free_port()
        self._faults: dict[str, Fault] = {}
        self._used: dict[str, int] = {}
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_fault(self, match: str, fault: Fault) -> None:
        with self._lock:
            self._faults[match] = fault
            self._used[match] = 0

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def hits(self, match: str) -> int:
        with self._lock:
            return self._hits.get(match, 0)

    def _fault_for(self, path: str) -> Fault | None:
        with self._lock:
            for match, fault in self._faults.items():
                if match in path:
                    self._hits[match] = self._hits.get(match, 0) + 1
                    if self._used[match] >= fault.times:
                        return None
                    self._used[match] += 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        fault = self._fault_for(request.path_qs)
        if fault is not None and fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
            return web.Response(status=fault.status, text="injected fault", headers=headers)
        forward = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        upstream = await self._session.request(
            request.method,
            self.target_url + request.path_qs,
            headers=forward,
            data=await request.read() if request.can_read_body else None,
            allow_redirects=False,
        )
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                    response.headers[key] = value
            body_fault = fault is not None and request.method == "GET" and upstream.status == 200
            if body_fault and fault is not None and fault.kind in ("length", "overrun"):
                return await self._misframed(request, response, upstream, fault)
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                data = bytearray(chunk)
                if fault is not None and fault.kind == "trickle" and body_fault:
                    await self._trickle(request, response, bytes(data), sent, fault)
                    sent += len(data)
                    continue
                if fault is not None:
                    end = sent + len(data)
                    if fault.kind == "corrupt" and sent <= fault.offset < end:
                        data[fault.offset - sent] ^= 0xFF
                    if fault.kind == "cut" and end > fault.offset:
                        await response.write(bytes(data[: fault.offset - sent]))
                        assert request.transport is not None
                        request.transport.close()  # the promised length is never reached
                        return response
                    if fault.kind == "stall" and sent <= fault.offset < end:
                        await asyncio.sleep(fault.seconds)
                    if fault.kind == "drip":
                        await asyncio.sleep(len(data) / fault.bytes_per_second)
                await response.write(bytes(data))
                sent += len(data)
            await response.write_eof()
            return response

    @staticmethod
    async def _trickle(
        request: web.Request, response: web.StreamResponse, data: bytes, sent: int, fault: Fault
    ) -> None:
        """Send ``data`` (at ``sent`` in the body): fast up to the fault's offset, then
        a small piece at a time (bounded by ``TRICKLE_LIMIT``)."""
        fast = max(0, min(len(data), fault.offset - sent))
        if fast:
            await response.write(data[:fast])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TRICKLE_LIMIT
        for start in range(fast, len(data), max(1, fault.amount)):
            if loop.time() > deadline or request.transport is None:
                raise ConnectionResetError("trickle over")
            await asyncio.sleep(fault.seconds)
            await response.write(data[start : start + max(1, fault.amount)])

    @staticmethod
    async def _misframed(
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        fault: Fault,
    ) -> web.StreamResponse:
        """A body framed wrong: announced ``amount`` bytes off (``length``), or sent
        without a length and ``amount`` bytes too long (``overrun``)."""
        body = await upstream.read()
        if fault.kind == "length":
            announced = len(body) + fault.amount
            response.headers["Content-Length"] = str(announced)
            await response.prepare(request)
            await response.write(body[:announced] + b"\0" * max(0, announced - len(body)))
        else:
            response.headers.pop("Content-Length", None)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(body + b"\0" * fault.amount)
        await response.write_eof()
        if request.transport is not None:
            request.transport.close()
        return response

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def setup() -> None:
                self._session = aiohttp.ClientSession(auto_decompress=False)
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None)
                await self._runner.setup()
                await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

            loop.run_until_complete(setup())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None
