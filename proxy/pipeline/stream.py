"""The one held-back hashing streamer, for uncached streams and cache fills alike.

A blob body is moved by a worker thread, a big piece at a time: read from the
upstream (``proxy.upstream.body``), hashed in a second thread while the piece is
delivered (sent to the client, or written to the ingest file), and checked against
its size and digest at the end. Per piece, Python does one read call, one hash
submission and one delivery; per GiB that is about a thousand calls.

The rule is the same on every path: the last ``HOLD_BACK`` bytes of what a client
asked for leave only after the whole blob matched its digest. An uncached stream
keeps them in ``HeldBackSender`` and releases them after the check; a fill's readers
(``proxy.pipeline.fills.FillReader``) stop that far short of what is written until the
fill committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from proxy.oci.digest import Digest
from proxy.oci.ranges import ByteRange
from proxy.pipeline.tarcheck import LayerCheck, LayerPlan, TarRefused
from proxy.upstream.body import BodyReader

# The reused buffers a body is read into: two, so one is read while the other is
# hashed and delivered.
PIECE = 1024 * 1024
# Bytes of a client's (ranged) body held back until the digest matched.
HOLD_BACK = 64 * 1024
# Concurrent streams and fills, each holding a mover thread and (briefly) a hash one.
MAX_STREAMS = 256

T = TypeVar("T")
Deliver = Callable[[memoryview, int], None]
"""Takes each hashed piece with its offset in the blob, in the mover thread."""


class Cancellable(Protocol):
    def cancel(self) -> None:
        """Make the blocked mover give up soon."""


class BodyBroken(Exception):
    """The body is wrong (digest) or incomplete (size, connection): nothing of it may
    be completed, cached or trusted."""

    def __init__(self, reason: str, *, truncated: bool, refused: LayerPlan | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated
        # The bytes are the blob, but a file inside it is not what this plan says.
        self.refused = refused


class ClientGone(ConnectionError):
    """The client connection closed, or accepted nothing for the idle timeout."""


class DataPath:
    """The threads that move and hash blob bytes, owned by the pipeline.

    Movers and hashers live in two pools of the same size, so a mover waiting for its
    hash can never starve the pool it waits on.
    """

    def __init__(self, *, max_streams: int = MAX_STREAMS) -> None:
        self.movers = ThreadPoolExecutor(max_streams, thread_name_prefix="move")
        self.hashers = ThreadPoolExecutor(max_streams, thread_name_prefix="hash")

    async def run(self, source: Cancellable, move: Callable[[], T]) -> T:
        """Run ``move`` in a mover thread. If the caller is cancelled, ``source`` is
        cancelled and the thread waited for, so nothing it uses is closed under it."""
        future = asyncio.get_running_loop().run_in_executor(self.movers, move)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            source.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait({future})
                future.exception()  # retrieved: the mover stopped because it was told to
            raise

    def close(self) -> None:
        self.movers.shutdown(wait=False, cancel_futures=True)
        self.hashers.shutdown(wait=False, cancel_futures=True)


def hash_and_deliver(
    *,
    digest: Digest,
    size: int | None,
    body: BodyReader,
    deliver: Deliver,
    hashers: concurrent.futures.Executor,
    plans: tuple[LayerPlan, ...] = (),
) -> int:
    """Read ``body`` to its end, hash it, hand every piece to ``deliver``; return the
    byte count. Runs in a mover thread.

    1. Read a piece into the free one of two buffers.
    2. Wait for the previous piece's hash (and file check), then hash this one in a
       hash thread (one piece in flight keeps the hasher's order), check the files in
       it against ``plans`` (a tar layer's signed files) in another, and deliver it
       meanwhile.
    3. At the end, the count must equal ``size`` (if announced), the hash ``digest``,
       and the files their plans; otherwise ``BodyBroken``. Callers release the held
       tail (or commit) only after this returns.
    """
    hasher = digest.hasher()
    check = LayerCheck(plans) if plans else None
    buffers = (memoryview(bytearray(PIECE)), memoryview(bytearray(PIECE)))
    received = 0
    hashing: concurrent.futures.Future[None] | None = None
    checking: concurrent.futures.Future[None] | None = None
    turn = 0
    try:
        while True:
            view = buffers[turn]
            count = body.readinto(view)
            if count == 0:
                break
            if size is not None and received + count > size:
                raise BodyBroken("upstream sent more bytes than announced", truncated=True)
            piece = view[:count]
            if hashing is not None:
                hashing.result()
            if checking is not None:
                _checked(checking)
            hashing = hashers.submit(hasher.update, piece)
            if check is not None:
                checking = hashers.submit(check.feed, piece)
            deliver(piece, received)
            received += count
            turn ^= 1
        if hashing is not None:
            hashing.result()
            hashing = None
        if checking is not None:
            pending, checking = checking, None
            _checked(pending)
    finally:
        # Leaving early: the buffers must stay untouched until their hash and check are done.
        for future in (hashing, checking):
            if future is not None:
                with contextlib.suppress(BaseException):
                    future.result()
    if size is not None and received != size:
        raise BodyBroken(f"upstream body ended after {received} of {size} bytes", truncated=True)
    actual = hasher.hexdigest()
    if actual != digest.hex:
        raise BodyBroken(f"upstream bytes hash to {digest.algorithm}:{actual}", truncated=False)
    if check is not None:
        try:
            check.finish()
        except TarRefused as exc:
            raise BodyBroken(exc.reason, truncated=False, refused=exc.plan) from None
    return received


def _checked(future: concurrent.futures.Future[None]) -> None:
    try:
        future.result()
    except TarRefused as exc:
        raise BodyBroken(exc.reason, truncated=False, refused=exc.plan) from None


class SocketSender:
    """Blocking sends on a duplicate of a client's non-blocking socket descriptor."""

    def __init__(self, fd: int, *, idle_timeout: float = 60.0) -> None:
        self._fd = fd
        self._idle_ms = idle_timeout * 1000
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT)

    def __call__(self, data: memoryview) -> None:
        while data:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                if not self._poller.poll(self._idle_ms):
                    raise ClientGone(
                        f"client accepted no bytes for {self._idle_ms / 1000:.0f}s"
                    ) from None
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ClientGone(f"client went away: {exc.strerror}") from None
            data = data[sent:]


class RangedBody:
    """A blob body answered to one request: the whole blob, or one range of it."""

    size: int | None
    byte_range: ByteRange | None

    @property
    def content_length(self) -> int | None:
        return self.byte_range.length if self.byte_range is not None else self.size


class HeldBackSender:
    """Delivers the part of each piece inside ``byte_range`` (the whole blob if None)
    to ``send``, except the last ``HOLD_BACK`` bytes of that range, which it keeps
    until ``release``. Without a known size, it keeps a sliding tail instead."""

    def __init__(
        self,
        send: Callable[[memoryview], None],
        *,
        byte_range: ByteRange | None,
        size: int | None,
    ) -> None:
        self._send = send
        self._start = byte_range.start if byte_range else 0
        stop = byte_range.end + 1 if byte_range else size  # exclusive
        self._stop = stop
        self._hold_from = max(self._start, stop - HOLD_BACK) if stop is not None else None
        self._tail = bytearray()

    def __call__(self, piece: memoryview, offset: int) -> None:
        lo = max(offset, self._start)
        hi = offset + len(piece) if self._stop is None else min(offset + len(piece), self._stop)
        if lo >= hi:
            return
        if self._hold_from is not None:
            send_to = min(hi, self._hold_from)
            if send_to > lo:
                self._send(piece[lo - offset : send_to - offset])
            keep_from = max(lo, self._hold_from)
            if hi > keep_from:
                self._tail += piece[keep_from - offset : hi - offset]
            return
        # Unknown length: whatever exceeds HOLD_BACK bytes of tail goes out, oldest first.
        part = piece[lo - offset : hi - offset]
        excess = len(self._tail) + len(part) - HOLD_BACK
        if excess > 0:
            from_tail = min(excess, len(self._tail))
            if from_tail:
                self._send(memoryview(bytes(self._tail[:from_tail])))
                del self._tail[:from_tail]
            if excess > from_tail:
                self._send(part[: excess - from_tail])
                part = part[excess - from_tail :]
        self._tail += part

    def release(self) -> None:
        """Send the held-back tail: only once the whole blob matched its digest."""
        if self._tail:
            self._send(memoryview(self._tail))
            self._tail = bytearray()
