"""File locks for a cache directory shared by several processes.

Everything here is ``flock``: the lock belongs to an open file description, the kernel
drops it when the holding process dies (even by SIGKILL), and two descriptions of one
file conflict even inside one process. Descriptors are opened per use, never inherited
across ``fork`` (a forked child sharing a description would share its lock too).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

_USAGE = struct.Struct("<qq")  # bytes stored, bytes reserved by fills in progress


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """Take ``fd``'s lock without waiting; False if a conflicting lock is held."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def claim_lock_file(path: Path, *, create: bool = True) -> int | None:
    """The descriptor of ``path`` holding its exclusive lock, or None while another
    open file holds it (or, with ``create`` False, if there is no such file).

    Lock files are removed by their holder when done. A lock taken on a file that was
    removed meanwhile protects nothing, so it only counts if ``path`` still names the
    locked file; otherwise the new file at ``path`` is tried.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(16):
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            if not try_flock(fd):
                os.close(fd)
                return None
            if same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not create:
            return None
    raise OSError(f"lock file {path} keeps being replaced")


def lock_is_held(path: Path) -> bool:
    """Whether some open file holds ``path``'s exclusive lock right now.

    Probing takes the lock for an instant; a claim racing with the probe fails and
    is treated as "someone else fills", which the callers tolerate.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not try_flock(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(path: Path) -> Iterator[bool]:
    """Hold the store-wide lock file ``path`` (never removed) for the block, without
    waiting: yields False, holding nothing, if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        yield try_flock(fd)
    finally:
        os.close(fd)


class SharedUsage:
    """Bytes stored and bytes reserved by fills in progress, one pair for every
    process using the cache: two integers in one file, read and changed under its
    lock. Crashes can leave it off a little; rescans (startup, eviction) reset it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, int]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._unpack(os.pread(fd, _USAGE.size, 0))
        finally:
            os.close(fd)

    def add(self, *, stored: int = 0, reserved: int = 0) -> tuple[int, int]:
        """Add the deltas (never below zero); returns the new pair."""
        with self._locked() as fd:
            old_stored, old_reserved = self._unpack(os.pread(fd, _USAGE.size, 0))
            new = (max(0, old_stored + stored), max(0, old_reserved + reserved))
            os.pwrite(fd, _USAGE.pack(*new), 0)
            return new

    def set(self, *, stored: int, reserved: int | None = None) -> None:
        """Replace the pair (``reserved`` None: keep the reservations)."""
        with self._locked() as fd:
            if reserved is None:
                _, reserved = self._unpack(os.pread(fd, _USAGE.size, 0))
            os.pwrite(fd, _USAGE.pack(max(0, stored), max(0, reserved)), 0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _unpack(data: bytes) -> tuple[int, int]:
        if len(data) != _USAGE.size:
            return 0, 0
        stored, reserved = _USAGE.unpack(data)
        return int(stored), int(reserved)
