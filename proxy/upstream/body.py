"""Blob bodies read from a worker thread, in big pieces, without the event loop.

A verifying stream is bound by one core's sha256; every other cost per byte comes on
top of it. Read through aiohttp, a body arrives in the loop a socket read at a time,
each one parsed, buffered and handed over by Python. ``SocketBody`` instead takes the
connection of a plain-HTTP response with a known length once its headers are parsed:
the loop stops reading it, and a worker thread reads the rest straight from the
socket into its own reused buffer, with blocking reads that wait for a whole piece
(``MSG_WAITALL``): one system call per piece, not one per segment.

Anything else (TLS, chunked transfer, a test fake) is a ``LoopBody``: the loop's
async iterator, read from the worker thread one piece at a time.

Both raise only ``OCIError``s (``UpstreamError``, ``UpstreamTimeout``,
``UpstreamTooSlow``) and ``BodyCancelled``.

A body may carry a ``RateFloor`` (``minRate``): an upstream that keeps its reader
waiting while it sends less than that many bytes per second, over a window of such
waiting, is cut (``UpstreamTooSlow``) instead of holding the pull, its fill and its
staging file for hours, one small piece just inside the read timeout at a time. Only
time spent waiting for the upstream counts, never time the reader spent delivering
(a slow client or disk is not the upstream's fault). The floor is consulted only
where a reader waits already (a socket receive that timed out, a piece fetched from
the loop): a body that arrives faster than it is read costs nothing more per piece.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Protocol

from proxy.oci.errors import UpstreamError, UpstreamTimeout, UpstreamTooSlow

# How often a thread blocked on the socket looks whether it was cancelled or idle.
CANCEL_POLL_MS = 200
# The first read of a body asks for this much (see ``SocketBody``).
FIRST_READ = 64 * 1024


class BodyCancelled(Exception):
    """The reader was cancelled (every client left, or shutdown)."""


class RateFloor:
    """The minimum transfer rate of one body: ``min_rate`` bytes per second of waiting
    for the upstream, judged each time ``window`` seconds of waiting have added up.

    The bytes of a window are all that arrived since it began, the waiting only the
    time the reader was blocked on the upstream: a body that arrives as fast as it is
    read adds no waiting at all, and a slow client or disk does not count against
    the upstream. One instance per body, used from its reader's thread only.
    """

    __slots__ = ("_waited", "_window_start", "min_rate", "window")

    def __init__(self, *, min_rate: float, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self._waited = 0.0
        self._window_start = 0  # body bytes received when the window began

    def left(self) -> float:
        """Seconds of waiting until the current window is judged."""
        return max(self.window - self._waited, 0.001)

    def waited(self, seconds: float, received: int) -> None:
        """Count ``seconds`` more of waiting, with ``received`` body bytes so far.

        Raises ``UpstreamTooSlow`` when a whole window of waiting brought fewer than
        ``min_rate`` bytes per second of it; else, at a window's end, starts the next.
        """
        waited = self._waited + seconds
        if waited < self.window:
            self._waited = waited
            return
        got = received - self._window_start
        if got < self.min_rate * waited:
            raise UpstreamTooSlow(
                f"upstream sent {got} bytes in {waited:.0f}s of waiting mid-body, below "
                f"the minimum rate of {self.min_rate:.0f} bytes/s (minRate)"
            )
        self._waited = 0.0
        self._window_start = received


def rate_floor(min_rate: float, window: float) -> RateFloor | None:
    """A ``RateFloor``, or None when ``min_rate`` is 0 (off)."""
    if min_rate <= 0:
        return None
    return RateFloor(min_rate=min_rate, window=window)


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

    def __init__(
        self,
        *,
        fd: int,
        prefix: bytes,
        remaining: int,
        idle_timeout: float,
        floor: RateFloor | None = None,
    ) -> None:
        self._sock = socket.socket(fileno=fd)
        # Blocking reads that wait for a whole piece (MSG_WAITALL): one system call per
        # piece instead of one per segment the socket happened to hold. The loop never
        # touches this connection again, so its blocking mode is ours to set; the
        # receive timeout wakes the reader to look for cancellation and idleness.
        self._sock.setblocking(True)
        self._sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, CANCEL_POLL_MS * 1000)
        )
        self._prefix = memoryview(prefix)
        self._remaining = remaining
        # Body bytes in all (the floor counts what arrived from ``_remaining``).
        self._length = len(prefix) + remaining
        self._idle = idle_timeout
        self._floor = floor
        self._cancelled = threading.Event()
        self._closed = False
        # The first reads ask for little, so the first bytes go on without waiting
        # for a whole piece; each read asks for twice as much, up to the buffer.
        self._ask = FIRST_READ

    def readinto(self, view: memoryview) -> int:
        filled = 0
        if self._prefix:
            filled = min(len(self._prefix), len(view))
            view[:filled] = self._prefix[:filled]
            self._prefix = self._prefix[filled:]
        idle_since = waiting_since = time.monotonic()
        while filled < len(view) and self._remaining > 0:
            want = min(len(view) - filled, self._remaining, self._ask)
            try:
                count = self._sock.recv_into(view[filled:], want, socket.MSG_WAITALL)
            except (BlockingIOError, TimeoutError):
                count = -1
            except OSError as exc:
                raise UpstreamError(f"upstream connection broke: {exc.strerror}") from None
            if count == 0:
                raise UpstreamError(
                    f"upstream closed the connection with {self._remaining} body bytes missing"
                )
            if count < 0 or count < want:
                # The receive timeout passed: pass on what is here, or keep waiting.
                if count > 0:
                    filled += count
                    self._remaining -= count
                now = time.monotonic()
                if self._floor is not None:
                    # Waiting for the upstream: the only place the floor is looked at.
                    self._floor.waited(now - waiting_since, self._length - self._remaining)
                    waiting_since = now
                if filled:
                    break
                if self._cancelled.is_set():
                    raise BodyCancelled()
                if now - idle_since >= self._idle:
                    raise UpstreamTimeout(f"upstream sent nothing for {self._idle:.0f}s mid-body")
                continue
            filled += count
            self._remaining -= count
            self._ask = min(self._ask * 2, len(view))
        return filled

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class LoopBody:
    """A body that stays with the event loop: pieces of ``chunks``, fetched from the
    worker thread. The iterator must raise only ``OCIError``s."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        loop: asyncio.AbstractEventLoop,
        *,
        floor: RateFloor | None = None,
    ) -> None:
        self._chunks = chunks
        self._loop = loop
        self._floor = floor
        self._received = 0
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
                piece = self._fetched(self._pending)
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

    def _fetched(self, pending: concurrent.futures.Future[bytes]) -> bytes:
        """The next piece; with a floor, the wait for it is counted, and judged (the
        window being full) while it lasts, not only once the piece came."""
        floor = self._floor
        if floor is None:
            return pending.result()
        started = time.monotonic()
        while True:
            try:
                piece = pending.result(timeout=floor.left())
            except concurrent.futures.TimeoutError:
                now = time.monotonic()
                try:
                    floor.waited(now - started, self._received)  # raises below the rate
                except UpstreamTooSlow:
                    pending.cancel()
                    raise
                started = now
                continue
            floor.waited(time.monotonic() - started, self._received + len(piece))
            self._received += len(piece)
            return piece

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
