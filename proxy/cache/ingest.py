"""The ingest area, shared by every process using one cache directory.

One upstream fill per blob across processes: the process holding the exclusive flock
on ``ingest/<hex>.lock`` is the only one downloading that blob. Others follow its
files (``proxy.pipeline.follow``)::

    ingest/<hex>.lock      the fill lock, held by the filling process for the whole fill
    ingest/<hex>.info      where it writes and the size the upstream announced (JSON,
                           replaced atomically once the upstream answered)
    ingest/<hex>.<token>   the bytes as they are written; renamed into blobs/ on commit

Invariant: a ``<hex>.*`` file exists only while ``<hex>.lock`` does. The filler creates
the lock file first and removes it last, after its ingest file was committed or
removed. A lock file whose lock nobody holds is a dead filler's: whoever takes its
lock removes what it left (never commits it), then the lock file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from proxy.cache.locks import SharedUsage, claim_lock_file, same_file, try_flock

LOCK_SUFFIX = ".lock"
INFO_SUFFIX = ".info"


@dataclass(frozen=True, slots=True)
class FillInfo:
    """What a filling process published: its ingest file and the announced size."""

    ingest_path: Path
    size: int | None


@dataclass(frozen=True, slots=True)
class FillFiles:
    """The files of one blob's fill: in the ingest area, and its place in the store;
    ``usage`` holds the reservation a dead filler could not give back."""

    ingest_dir: Path
    hex: str
    blob_path: Path
    usage: SharedUsage | None = None

    @property
    def lock_path(self) -> Path:
        return self.ingest_dir / f"{self.hex}{LOCK_SUFFIX}"

    @property
    def info_path(self) -> Path:
        return self.ingest_dir / f"{self.hex}{INFO_SUFFIX}"

    def read_info(self) -> FillInfo | None:
        """The published fill info, or None (not published yet, or unreadable)."""
        try:
            doc = json.loads(self.info_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        name, size = doc.get("ingest"), doc.get("size")
        # Only a file of this blob, in the ingest area (no other path is ever followed).
        if not isinstance(name, str) or not name.startswith(f"{self.hex}.") or "/" in name:
            return None
        if size is not None and (not isinstance(size, int) or size < 0):
            return None
        return FillInfo(self.ingest_dir / name, size)

    def leftovers(self) -> list[Path]:
        """Every ``<hex>.*`` file in the ingest area except the lock file."""
        prefix = f"{self.hex}."
        with os.scandir(self.ingest_dir) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if entry.name.startswith(prefix) and entry.name != self.lock_path.name
            ]

    def remove_leftovers(self) -> int:
        """Remove a dead filler's files (the caller holds the lock) and give back
        the room it reserved; how many files."""
        info = self.read_info()
        if info is not None and info.size and self.usage is not None:
            self.usage.add(reserved=-info.size)
        removed = 0
        for path in self.leftovers():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed


class DiskFillLease:
    """The right to fill one blob, held as the lock on its lock file."""

    def __init__(self, files: FillFiles, lock_fd: int) -> None:
        self.files = files
        self._lock_fd = lock_fd

    @property
    def held(self) -> bool:
        return self._lock_fd >= 0

    def publish(self, ingest_path: Path, size: int | None) -> None:
        """Tell followers where the bytes go and how many the upstream announced."""
        files = self.files
        tmp = files.ingest_dir / f"{files.hex}{INFO_SUFFIX}-{secrets.token_hex(6)}"
        try:
            tmp.write_bytes(json.dumps({"ingest": ingest_path.name, "size": size}).encode())
            os.replace(tmp, files.info_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def release(self) -> None:
        """Give the fill up (idempotent). Its ingest file must be committed or removed
        by now: the lock file goes last, so followers see a finished fill."""
        if self._lock_fd < 0:
            return
        fd, self._lock_fd = self._lock_fd, -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.files.info_path)
            if same_file(fd, self.files.lock_path):
                os.unlink(self.files.lock_path)
        finally:
            os.close(fd)


def claim(files: FillFiles) -> DiskFillLease | None:
    """The lease on ``files``' blob, or None while another process fills it.

    Files a dead filler left are removed first, so a follower can never mistake them
    for the new fill's.
    """
    fd = claim_lock_file(files.lock_path)
    if fd is None:
        return None
    try:
        files.remove_leftovers()
    except BaseException:
        os.close(fd)
        raise
    return DiskFillLease(files, fd)


def reap(files: FillFiles, listed: list[Path]) -> int | None:
    """Remove a dead fill's files: how many, or None if a live process fills it.

    ``listed`` are this blob's ingest files as seen (listed) before the call. With no
    lock file, those are gone or orphans (the invariant above); a fresh listing could
    hold a new filler's files, created since, so only ``listed`` ones are removed.
    """
    try:
        fd = os.open(files.lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        removed = 0
        for path in listed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed
    try:
        if not try_flock(fd):
            return None
        return reap_locked(files, fd)
    finally:
        os.close(fd)


def reap_locked(files: FillFiles, lock_fd: int) -> int:
    """With the lock of ``lock_fd`` taken (its filler ended): if the lock file is still
    in place, the filler died; remove its files and the lock file. How many."""
    if not same_file(lock_fd, files.lock_path):
        return 0  # its filler finished and removed it
    removed = files.remove_leftovers()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(files.lock_path)
        removed += 1
    return removed
