"""The node-local content-addressed store, meant for a hostPath on NVMe.

Layout under ``root``::

    blobs/sha256/<hex>       verified blobs (entered only after their digest matched)
    ingest/<hex>.<token>     downloads in progress (removed at startup)
    quarantine/<hex>.<time>  blobs the scrub found corrupt

``manifests/`` and ``tags/`` beside them belong to ``DiskVerifiedManifests``
(``proxy/cache/verified_disk.py``).

The index is in memory: an LRU ordered dict (O(1) touch and evict), rebuilt from one
directory listing at startup. Blobs being read or filled are pinned and never evicted.
Fills reserve their announced size first, so concurrent fills cannot overshoot the
budget together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy.oci.digest import Digest

log = logging.getLogger("pullgate.cache")


@dataclass(frozen=True, slots=True)
class CacheLimits:
    max_bytes: int = 100 * 1024**3
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    min_free_bytes: int = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    blobs: int
    bytes: int
    ingest_removed: int
    seconds: float


class DiskBlobStore:
    """Verified blobs on local disk, LRU-evicted under a byte budget."""

    caching = True

    def __init__(self, *, root: Path, limits: CacheLimits) -> None:
        self.root = root
        self.limits = limits
        self.blob_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.quarantine_dir = root / "quarantine"
        self._index: OrderedDict[str, int] = OrderedDict()  # hex -> size, LRU first
        self._pins: dict[str, int] = {}
        self.total_bytes = 0
        # Bytes announced by fills in progress (not yet committed or abandoned).
        self.reserved_bytes = 0
        self.evicted = 0
        self.quarantined = 0
        # One scrub pass at a time (background loop and admin trigger share the store).
        self.scrub_lock = asyncio.Lock()

    # -- startup -------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Create the layout, drop leftover ingest files, rebuild the index."""
        started = time.perf_counter()
        for directory in (
            self.blob_dir,
            self.ingest_dir,
            self.quarantine_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        with os.scandir(self.ingest_dir) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.blob_dir) as entries:
            for entry in entries:
                name = entry.name
                if len(name) != 64 or not _is_hex(name):
                    log.warning("removing stray file %s from the blob store", entry.path)
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                stat = entry.stat()
                found.append((stat.st_atime, name, stat.st_size))
        found.sort()
        self._index = OrderedDict((name, size) for _, name, size in found)
        self.total_bytes = sum(size for _, _, size in found)
        report = RecoveryReport(
            blobs=len(self._index),
            bytes=self.total_bytes,
            ingest_removed=removed,
            seconds=time.perf_counter() - started,
        )
        log.info(
            "cache %s: %d blobs, %d bytes, %d leftover ingest files removed, in %.3fs",
            self.root,
            report.blobs,
            report.bytes,
            report.ingest_removed,
            report.seconds,
        )
        return report

    # -- BlobStore protocol --------------------------------------------------------

    def accepts(self, digest: Digest) -> bool:
        """Only sha256 blobs have a place in the layout."""
        return digest.algorithm == "sha256"

    def path_of(self, digest: Digest) -> Path | None:
        if digest.algorithm != "sha256" or digest.hex not in self._index:
            return None
        self._index.move_to_end(digest.hex)
        return self.blob_dir / digest.hex

    def path_of_quiet(self, digest: Digest) -> Path | None:
        """Like ``path_of`` but without counting as a use (for the scrub)."""
        if digest.algorithm != "sha256" or digest.hex not in self._index:
            return None
        return self.blob_dir / digest.hex

    # -- fills ---------------------------------------------------------------------

    def new_ingest(self, digest: Digest) -> Path:
        return self.ingest_dir / f"{digest.hex}.{secrets.token_hex(6)}"

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        """Move a fully verified (and fsynced) ingest file into the store."""
        if not self.accepts(digest):
            raise ValueError(f"the disk store keeps sha256 blobs only, not {digest.algorithm}")
        final = self.blob_dir / digest.hex
        os.replace(ingest_path, final)
        _fsync_dir(self.blob_dir)
        if digest.hex not in self._index:
            self.total_bytes += size
        self._index[digest.hex] = size
        self._index.move_to_end(digest.hex)
        self.evict_if_needed()
        return final

    def pin(self, digest: Digest) -> None:
        self._pins[digest.hex] = self._pins.get(digest.hex, 0) + 1

    def unpin(self, digest: Digest) -> None:
        count = self._pins.get(digest.hex, 0) - 1
        if count <= 0:
            self._pins.pop(digest.hex, None)
        else:
            self._pins[digest.hex] = count

    def make_room(self, size: int | None) -> bool:
        """Reserve room for a fill of ``size`` bytes, evicting as needed.

        False when the blob cannot be kept: bigger than the high watermark, or the
        disk would drop under the free-space floor even after eviction. The caller
        must ``release`` the same size once the fill committed or failed.
        """
        needed = size or 0
        if needed > self.limits.max_bytes * self.limits.high_watermark:
            return False
        self.evict_if_needed(reserve=needed)
        if self._free_bytes() - needed < self.limits.min_free_bytes:
            return False
        self.reserved_bytes += needed
        return True

    def release(self, size: int | None) -> None:
        """Give back a reservation made by ``make_room``."""
        self.reserved_bytes = max(0, self.reserved_bytes - (size or 0))

    def has_room_for(self, size: int | None) -> bool:
        """Whether a fill of ``size`` bytes fits above the free-disk floor (no eviction)."""
        return self._free_bytes() - (size or 0) >= self.limits.min_free_bytes

    # -- eviction ------------------------------------------------------------------

    def evict_if_needed(self, reserve: int = 0) -> int:
        """Evict least recently used, unpinned blobs down to the low watermark
        once usage (plus ``reserve`` and fills in progress) passes the high
        watermark, or while free disk minus ``reserve`` is under the floor."""
        high = self.limits.max_bytes * self.limits.high_watermark
        low = self.limits.max_bytes * self.limits.low_watermark
        floor = self.limits.min_free_bytes
        pending = reserve + self.reserved_bytes
        over_budget = self.total_bytes + pending > high
        under_floor = self._free_bytes() - reserve < floor
        if not over_budget and not under_floor:
            return 0
        freed = 0
        # Walk least recently used first; pinned blobs are skipped, never waited for.
        for name in list(self._index):
            if self.total_bytes + pending <= low and self._free_bytes() - reserve >= floor:
                break
            if name in self._pins:
                continue
            size = self._index.pop(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_dir / name)
            self.total_bytes -= size
            freed += size
            self.evicted += 1
        if freed:
            log.info("evicted %d bytes; cache now holds %d bytes", freed, self.total_bytes)
        return freed

    def _free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    # -- scrub and quarantine ------------------------------------------------------

    def digests(self) -> Iterator[Digest]:
        """A snapshot of stored digests, least recently used first."""
        for name in list(self._index):
            yield Digest("sha256", name)

    def is_pinned(self, digest: Digest) -> bool:
        return digest.hex in self._pins

    def quarantine(self, digest: Digest, reason: str) -> bool:
        """Take a blob out of service: it is never served again (a later pull
        fetches and verifies it afresh). False if it was no longer stored."""
        size = self._index.pop(digest.hex, None)
        if size is None:
            return False
        self.total_bytes -= size
        source = self.blob_dir / digest.hex
        target = self.quarantine_dir / f"{digest.hex}.{time.time_ns()}"
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            # Could not move it aside: delete it rather than leave it servable.
            log.error("cannot move %s to quarantine (%s); deleting it", source, exc)
            with contextlib.suppress(OSError):
                os.unlink(source)
        self.quarantined += 1
        log.error("quarantined blob %s: %s (moved to %s)", digest, reason, target)
        return True

    def __len__(self) -> int:
        return len(self._index)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
