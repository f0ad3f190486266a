"""Zero-copy file-to-socket transfer that works under uvloop.

uvloop has no ``loop.sendfile``, so aiohttp's ``FileResponse`` falls back to reading
the file into Python and writing it: about half of what the kernel can do. Here,
once aiohttp's own write buffer is empty, ``os.sendfile`` runs in a worker thread on
a duplicate of the connection's descriptor (the GIL is released throughout), waiting
with ``poll`` when the socket is full.
"""

from __future__ import annotations

import asyncio
import os
import select
from concurrent.futures import Executor

from aiohttp import web

SENDFILE_STEP = 16 * 1024 * 1024


class ClientStalled(ConnectionError):
    """The client accepted no bytes for longer than the idle timeout."""


async def flush(request: web.Request) -> None:
    """Wait until aiohttp has handed every buffered byte to the kernel."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client connection lost")
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("client connection lost")
        await asyncio.sleep(0.0005)


def socket_fd(request: web.Request) -> int:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client connection lost")
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ConnectionResetError("client connection has no socket")
    return int(sock.fileno())


async def sendfile(
    request: web.Request,
    file_fd: int,
    offset: int,
    count: int,
    *,
    pool: Executor,
    idle_timeout: float = 60.0,
) -> None:
    """Send ``count`` bytes of ``file_fd`` from ``offset`` to the client."""
    if count <= 0:
        return
    await flush(request)
    out_fd = os.dup(socket_fd(request))
    try:
        await asyncio.get_running_loop().run_in_executor(
            pool, _sendfile_blocking, out_fd, file_fd, offset, count, idle_timeout
        )
    finally:
        os.close(out_fd)


def _sendfile_blocking(
    out_fd: int, in_fd: int, offset: int, count: int, idle_timeout: float
) -> None:
    poller = select.poll()
    poller.register(out_fd, select.POLLOUT)
    while count > 0:
        try:
            sent = os.sendfile(out_fd, in_fd, offset, min(count, SENDFILE_STEP))
        except BlockingIOError:
            if not poller.poll(idle_timeout * 1000):
                raise ClientStalled(f"client accepted no bytes for {idle_timeout:.0f}s") from None
            continue
        if sent == 0:
            raise ConnectionResetError("file ended early or connection closed")
        offset += sent
        count -= sent
