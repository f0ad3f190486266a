"""Blob bodies read from a worker thread, in big pieces, without the event loop.

A verifying stream is bound by one core's sha256; every other cost per byte comes on
top of it. Read through aiohttp, a body arrives in the loop a socket read at a time,
each one parsed, buffered and handed over by Python. ``SocketBody`` instead takes the
connection of a plain-HTTP response with a known length once its headers are parsed:
the loop stops reading it, and a worker thread reads the rest straight from the
socket into its own reused buffer (``readv``), many socket reads per Python call.

Anything else (TLS, chunked transfer, a test fake) is a ``LoopBody``: the loop's
async iterator, read from the worker thread one piece at a time.

Both raise only ``OCIError``s (``UpstreamError``, ``UpstreamTimeout``) and
``BodyCancelled``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from proxy.oci.errors import UpstreamError, UpstreamTimeout

# How often a thread blocked on the socket looks whether it was cancelled.
CANCEL_POLL_MS = 200


class BodyCancelled(Exception):
    """The reader was cancelled (every client left, or shutdown)."""


class BodyReader(Protocol):
    """A blob body, read from a worker thread."""

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the next bytes (blocking); 0 at the end of the body.

        Returns as soon as some bytes are there and no more are immediately readable,
        so a slow upstream's bytes are passed on without waiting for a full buffer.
        """

    def cancel(self) -> None:
        """Make a blocked or later ``readinto`` raise ``BodyCancelled``."""

    def close(self) -> None:
        """Release what the reader holds (from the event loop thread)."""


class SocketBody:
    """The rest of a plain-HTTP body, read directly from the connection's socket.

    ``prefix`` holds what aiohttp had buffered already; ``remaining`` is the number
    of body bytes still in the socket. The descriptor is a duplicate, closed here.
    """

    def __init__(self, *, fd: int, prefix: bytes, remaining: int, idle_timeout: float) -> None:
        self._fd = fd
        self._prefix = memoryview(prefix)
        self._remaining = remaining
        self._idle_ms = idle_timeout * 1000
        self._cancelled = threading.Event()
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._closed = False

    def readinto(self, view: memoryview) -> int:
        filled = 0
        if self._prefix:
            filled = min(len(self._prefix), len(view))
            view[:filled] = self._prefix[:filled]
            self._prefix = self._prefix[filled:]
        while filled < len(view) and self._remaining > 0:
            want = min(len(view) - filled, self._remaining)
            try:
                count = os.readv(self._fd, [view[filled : filled + want]])
            except BlockingIOError:
                if filled:
                    break  # pass on what is here; the caller comes back for more
                self._wait_readable()
                continue
            except OSError as exc:
                raise UpstreamError(f"upstream connection broke: {exc.strerror}") from None
            if count == 0:
                raise UpstreamError(
                    f"upstream closed the connection with {self._remaining} body bytes missing"
                )
            filled += count
            self._remaining -= count
        return filled

    def _wait_readable(self) -> None:
        waited = 0.0
        while True:
            if self._cancelled.is_set():
                raise BodyCancelled()
            if self._poller.poll(CANCEL_POLL_MS):
                return
            waited += CANCEL_POLL_MS
            if waited >= self._idle_ms:
                raise UpstreamTimeout(
                    f"upstream sent nothing for {self._idle_ms / 1000:.0f}s mid-body"
                )

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class LoopBody:
    """A body that stays with the event loop: pieces of ``chunks``, fetched from the
    worker thread. The iterator must raise only ``OCIError``s."""

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = chunks
        self._loop = loop
        self._piece = memoryview(b"")
        self._pending: concurrent.futures.Future[bytes] | None = None
        self._cancelled = threading.Event()
        self._ended = False

    def readinto(self, view: memoryview) -> int:
        while not self._piece:
            if self._ended:
                return 0
            if self._cancelled.is_set():
                raise BodyCancelled()
            self._pending = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            try:
                piece = self._pending.result()
            except concurrent.futures.CancelledError:
                raise BodyCancelled() from None
            finally:
                self._pending = None
            if not piece:
                self._ended = True
            self._piece = memoryview(piece)
        count = min(len(view), len(self._piece))
        view[:count] = self._piece[:count]
        self._piece = self._piece[count:]
        return count

    async def _next(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return b""

    def cancel(self) -> None:
        self._cancelled.set()
        pending = self._pending
        if pending is not None:
            pending.cancel()

    def close(self) -> None:
        pass
