"""Big blobs bypass the page cache, on the way in and on the way out.

A 100 GB model written through the page cache evicts what the node keeps there
(containerd's content, the pods' files) for a file that is read again rarely: once
containerd has the layer, it does not pull it again. So blobs of ``DIRECT_MIN_BYTES``
and more are written with ``O_DIRECT`` through an aligned staging buffer, and the
client that asked for them is fed from memory as they arrive (``proxy.pipeline.fills``).

A hit on such a blob whose pages are not resident is read with ``O_DIRECT`` too,
ahead of the sender by one buffer, instead of through ``sendfile``, which would
first fill the page cache with it. Resident files (just written through the cache,
or read by someone else) keep going out with ``sendfile``.

Where ``O_DIRECT`` is refused (tmpfs, some overlay setups), everything goes through
the page cache as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable

ALIGN = 4096
DIRECT_MIN_BYTES = 64 * 1024 * 1024
STAGE = 8 * 1024 * 1024


class Cancelled(Exception):
    """The transfer was cancelled (client gone, shutdown)."""


def open_ingest(path: str, *, direct: bool) -> tuple[int, bool]:
    """Create the ingest file; returns (fd, whether it is open with ``O_DIRECT``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o600), False


WriteAt = Callable[[int, memoryview, int], None]


class IngestWriter:
    """Appends a blob's pieces to its ingest file, in order.

    With ``O_DIRECT``, pieces are gathered in an aligned staging buffer and written a
    whole buffer at a time; ``write`` returns how many bytes the file holds, which
    trails what was given by less than ``STAGE``. ``finish`` writes the rest.
    """

    def __init__(self, fd: int, *, direct: bool, write_at: WriteAt) -> None:
        self._fd = fd
        self._direct = direct
        self._write_at = write_at
        self._stage = mmap.mmap(-1, STAGE) if direct else None
        self._staged = 0
        self.in_file = 0
        self.direct_bytes = 0  # how many of ``in_file`` were written around the page cache

    def write(self, piece: memoryview) -> int:
        stage = self._stage
        if stage is None:
            self._write_at(self._fd, piece, self.in_file)
            self.in_file += len(piece)
            return self.in_file
        view = memoryview(stage)
        try:
            while piece:
                count = min(STAGE - self._staged, len(piece))
                view[self._staged : self._staged + count] = piece[:count]
                self._staged += count
                piece = piece[count:]
                if self._staged == STAGE:
                    self._write_at(self._fd, view, self.in_file)
                    self.in_file += STAGE
                    self.direct_bytes += STAGE
                    self._staged = 0
        finally:
            view.release()
        return self.in_file

    def finish(self) -> int:
        """Write what is staged: the aligned part directly, the tail through the page
        cache (``O_DIRECT`` needs whole blocks). Returns the file's length."""
        stage = self._stage
        if stage is None or not self._staged:
            return self.in_file
        view = memoryview(stage)
        try:
            aligned = self._staged - self._staged % ALIGN
            if aligned:
                self._write_at(self._fd, view[:aligned], self.in_file)
                self.in_file += aligned
                self.direct_bytes += aligned
            if aligned < self._staged:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self._write_at(self._fd, view[aligned : self._staged], self.in_file)
                self.in_file += self._staged - aligned
            self._staged = 0
        finally:
            view.release()
        return self.in_file

    def close(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None


def resident(fd: int, size: int) -> bool:
    """Whether the file's pages look cached: a few probes that never wait for IO."""
    probe = bytearray(1)
    for offset in {0, size // 2, max(0, size - 1)}:
        try:
            os.preadv(fd, [probe], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True  # cannot tell: the page cache path is always correct
    return True


class DirectReader:
    """Reads ``[offset, offset + count)`` of a file with ``O_DIRECT``, one aligned
    buffer ahead of the consumer (the read-ahead runs in ``helpers``)."""

    def __init__(
        self,
        path: str,
        offset: int,
        count: int,
        *,
        helpers: concurrent.futures.Executor,
    ) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self._helpers = helpers
        self._offset = offset
        self._count = count
        self._cancelled = threading.Event()
        self._buffers = (mmap.mmap(-1, STAGE), mmap.mmap(-1, STAGE))

    def send(self, send: Callable[[memoryview], None]) -> None:
        """Send the range to ``send`` (blocking; from a mover thread)."""
        start = self._offset - self._offset % ALIGN
        skip = self._offset - start
        left = self._count
        turn = 0
        reading = self._helpers.submit(self._read, self._buffers[0], start)
        position = start
        try:
            while left > 0:
                got = reading.result()
                if got == 0:
                    raise OSError(errno.EIO, "cached blob is shorter than its size")
                if self._cancelled.is_set():
                    raise Cancelled()
                buffer = self._buffers[turn]
                position += got
                turn ^= 1
                if left - (got - skip) > 0:
                    reading = self._helpers.submit(self._read, self._buffers[turn], position)
                view = memoryview(buffer)
                try:
                    part = view[skip : min(got, skip + left)]
                    send(part)
                    left -= len(part)
                    part.release()
                finally:
                    view.release()
                skip = 0
        finally:
            with contextlib.suppress(BaseException):
                reading.result()

    def _read(self, buffer: mmap.mmap, position: int) -> int:
        return os.preadv(self._fd, [buffer], position)

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        os.close(self._fd)
        for buffer in self._buffers:
            buffer.close()
