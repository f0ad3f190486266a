"""The node-local content-addressed store, meant for a hostPath on NVMe.

Layout under ``root``::

    blobs/sha256/<hex>       verified blobs (entered only after their digest matched)
    ingest/<hex>.lock|.info|.<token>
                             fills in progress (see ``proxy.cache.ingest``)
    quarantine/<hex>.<time>  blobs the scrub found corrupt
    locks/evict, locks/scrub one evictor and one scrubber at a time (store-wide flocks)
    locks/usage              bytes stored and reserved, shared by every process

``manifests/`` and ``tags/`` beside them belong to ``DiskVerifiedManifests``
(``proxy/cache/verified_disk.py``).

Several processes (workers) may share one root. The files are the truth; each process
keeps an index of the blobs it knows: an LRU ordered dict (O(1) touch and evict),
rebuilt from one directory listing at startup and whenever it evicts. A blob another
process committed is adopted on its first lookup (one ``stat``); one another process
evicted or quarantined is dropped from the index on its next lookup.

Blobs being read or filled are pinned and never evicted: a pin holds a shared flock
on the blob file, and eviction takes the exclusive one without waiting, skipping the
blob when it cannot. Fills reserve their announced size first (in ``locks/usage``), so
concurrent fills, in any process, cannot overshoot the budget together.
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

from proxy.cache import ingest as fill_files
from proxy.cache.ingest import DiskFillLease, FillFiles
from proxy.cache.locks import SharedUsage, same_file, store_lock, try_flock
from proxy.oci.digest import Digest

log = logging.getLogger("pullgate.cache")

# A hit refreshes the blob file's atime when it is older than this, so that processes
# rebuilding their LRU from the directory see uses made elsewhere (at most one metadata
# write per blob per period).
ATIME_REFRESH = 3600.0


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


@dataclass(frozen=True, slots=True)
class ScannedBlob:
    """A blob file found by a directory scan, with its last known use."""

    hex: str
    size: int
    used_at: float


class DiskBlobStore:
    """Verified blobs on local disk, LRU-evicted under a byte budget."""

    caching = True

    def __init__(self, *, root: Path, limits: CacheLimits) -> None:
        self.root = root
        self.limits = limits
        self.blob_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.quarantine_dir = root / "quarantine"
        self.lock_dir = root / "locks"
        self._usage = SharedUsage(self.lock_dir / "usage")
        self._index: OrderedDict[str, int] = OrderedDict()  # hex -> size, LRU first
        self._used_at: dict[str, float] = {}  # hex -> wall time of last use known here
        self._pins: dict[str, int] = {}
        # Shared flocks on pinned blob files: other processes' eviction skips them.
        self._pin_fds: dict[str, int] = {}
        self.evicted = 0
        self.quarantined = 0
        # One scrub pass at a time in this process (background loop and admin trigger
        # share the store); ``locks/scrub`` keeps other processes out.
        self.scrub_lock = asyncio.Lock()

    # -- shared accounting -----------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of verified blobs in the store (every process's commits)."""
        return self._usage.read()[0]

    @property
    def reserved_bytes(self) -> int:
        """Bytes announced by fills in progress, in every process."""
        return self._usage.read()[1]

    # -- startup -------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Create the layout, drop leftover ingest files of dead fills (a live
        process's fills are kept), rebuild the index and the shared accounting."""
        started = time.perf_counter()
        for directory in (
            self.blob_dir,
            self.ingest_dir,
            self.quarantine_dir,
            self.lock_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        removed, reserved = self._sweep_ingest(startup=True)
        found = self.scan_blobs(remove_strays=True)
        self.merge_scan(found)
        total = sum(blob.size for blob in found)
        self._usage.set(stored=total, reserved=reserved)
        report = RecoveryReport(
            blobs=len(self._index),
            bytes=total,
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

    def _sweep_ingest(self, *, startup: bool) -> tuple[int, int]:
        """Remove dead fills' files (and, at startup, stray temp files); returns how
        many files went and the bytes live fills announced (their reservations)."""
        groups: dict[str, list[Path]] = {}
        strays: list[Path] = []
        with os.scandir(self.ingest_dir) as entries:
            for entry in entries:
                stem, dot, _ = entry.name.partition(".")
                if dot and len(stem) == 64 and _is_hex(stem):
                    groups.setdefault(stem, []).append(Path(entry.path))
                else:
                    strays.append(Path(entry.path))
        removed = 0
        if startup:
            # Not a fill's file (nothing else is written here): left by older versions.
            for path in strays:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
        reserved = 0
        for hex_name, listed in groups.items():
            files = self.fill_files(Digest("sha256", hex_name))
            info = files.read_info()
            count = fill_files.reap(files, [p for p in listed if p != files.lock_path])
            if count is None:
                reserved += (info.size or 0) if info is not None else 0
            else:
                removed += count
        return removed, reserved

    def scan_blobs(self, *, remove_strays: bool = False) -> list[ScannedBlob]:
        """Every blob file, with its size and last use as the file system knows it
        (atime or mtime). Plain I/O: may run in a worker thread."""
        found: list[ScannedBlob] = []
        with os.scandir(self.blob_dir) as entries:
            for entry in entries:
                name = entry.name
                if len(name) != 64 or not _is_hex(name):
                    if remove_strays:
                        log.warning("removing stray file %s from the blob store", entry.path)
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                used_at = max(stat.st_atime, stat.st_mtime)
                found.append(ScannedBlob(name, stat.st_size, used_at))
        return found

    def merge_scan(self, found: list[ScannedBlob]) -> None:
        """Make the index the scanned blobs, ordered by last use (uses seen by this
        process count too; ties keep the index's order). Known blobs the scan missed
        stay if their file exists (committed while a scan ran in a worker thread)."""
        rank = {name: position for position, name in enumerate(self._index)}
        scanned = {blob.hex for blob in found}
        found = list(found)
        for name, size in self._index.items():
            if name not in scanned and os.path.lexists(self.blob_dir / name):
                found.append(ScannedBlob(name, size, self._used_at.get(name, 0.0)))
        ordered = sorted(
            (
                max(blob.used_at, self._used_at.get(blob.hex, 0.0)),
                rank.get(blob.hex, -1),
                blob.hex,
                blob.size,
            )
            for blob in found
        )
        self._index = OrderedDict((name, size) for _, _, name, size in ordered)
        self._used_at = {name: used_at for used_at, _, name, _ in ordered}

    def _resync(self) -> None:
        """Index and bytes stored from the disk (other processes' commits and
        evictions included). Dead fills' files go, and their reservations with them;
        live reservations stay counted (a fill reserves before it publishes)."""
        found = self.scan_blobs()
        self.merge_scan(found)
        self._sweep_ingest(startup=False)
        self._usage.set(stored=sum(blob.size for blob in found))

    # -- BlobStore protocol --------------------------------------------------------

    def accepts(self, digest: Digest) -> bool:
        """Only sha256 blobs have a place in the layout."""
        return digest.algorithm == "sha256"

    def path_of(self, digest: Digest) -> Path | None:
        """The blob's file, checked on disk: committed by any process, and not
        evicted or quarantined by any since."""
        if digest.algorithm != "sha256":
            return None
        path = self.blob_dir / digest.hex
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._forget(digest.hex)
            return None
        self._index[digest.hex] = stat.st_size  # adopts another process's commit
        self._index.move_to_end(digest.hex)
        now = time.time()
        self._used_at[digest.hex] = now
        if now - stat.st_atime > ATIME_REFRESH:
            with contextlib.suppress(OSError):
                os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
        return path

    def path_of_quiet(self, digest: Digest) -> Path | None:
        """Like ``path_of`` but without counting as a use (for the scrub)."""
        if digest.algorithm != "sha256" or digest.hex not in self._index:
            return None
        return self.blob_dir / digest.hex

    def _forget(self, hex_name: str) -> None:
        """Drop a blob another process removed (it already did the accounting)."""
        self._index.pop(hex_name, None)
        self._used_at.pop(hex_name, None)

    # -- fills ---------------------------------------------------------------------

    def new_ingest(self, digest: Digest) -> Path:
        return self.ingest_dir / f"{digest.hex}.{secrets.token_hex(6)}"

    def fill_files(self, digest: Digest) -> FillFiles:
        """Where a fill of ``digest`` keeps its lock, info and bytes."""
        return FillFiles(self.ingest_dir, digest.hex, self.blob_dir / digest.hex, self._usage)

    def claim_fill(self, digest: Digest) -> DiskFillLease | None:
        """The right to fill ``digest``, or None while another process fills it."""
        return fill_files.claim(self.fill_files(digest))

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        """Move a fully verified (and fsynced) ingest file into the store."""
        if not self.accepts(digest):
            raise ValueError(f"the disk store keeps sha256 blobs only, not {digest.algorithm}")
        final = self.blob_dir / digest.hex
        replaced = os.path.lexists(final)
        os.replace(ingest_path, final)
        _fsync_dir(self.blob_dir)
        if not replaced:
            self._usage.add(stored=size)
        self._index[digest.hex] = size
        self._index.move_to_end(digest.hex)
        self._used_at[digest.hex] = time.time()
        if digest.hex in self._pins and digest.hex not in self._pin_fds:
            self._lock_pin(digest.hex)  # pinned before the file existed (a fill)
        self.evict_if_needed()
        return final

    def pin(self, digest: Digest) -> None:
        count = self._pins.get(digest.hex, 0)
        self._pins[digest.hex] = count + 1
        if count == 0:
            self._lock_pin(digest.hex)

    def unpin(self, digest: Digest) -> None:
        count = self._pins.get(digest.hex, 0) - 1
        if count <= 0:
            self._pins.pop(digest.hex, None)
            fd = self._pin_fds.pop(digest.hex, -1)
            if fd >= 0:
                os.close(fd)
        else:
            self._pins[digest.hex] = count

    def _lock_pin(self, hex_name: str) -> None:
        """Hold a shared lock on the blob file while pinned, for other processes."""
        try:
            fd = os.open(self.blob_dir / hex_name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # not stored (yet): nothing another process could evict
        if try_flock(fd, shared=True):
            self._pin_fds[hex_name] = fd
        else:
            os.close(fd)  # being evicted this instant: the pin cannot save it

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
        self._usage.add(reserved=needed)
        return True

    def release(self, size: int | None) -> None:
        """Give back a reservation made by ``make_room``."""
        self._usage.add(reserved=-(size or 0))

    def has_room_for(self, size: int | None) -> bool:
        """Whether a fill of ``size`` bytes fits above the free-disk floor (no eviction)."""
        return self._free_bytes() - (size or 0) >= self.limits.min_free_bytes

    # -- eviction ------------------------------------------------------------------

    def _needs_eviction(self, reserve: int) -> bool:
        stored, reserved = self._usage.read()
        high = self.limits.max_bytes * self.limits.high_watermark
        over_budget = stored + reserved + reserve > high
        return over_budget or self._free_bytes() - reserve < self.limits.min_free_bytes

    def _evicted_enough(self, reserve: int) -> bool:
        stored, reserved = self._usage.read()
        low = self.limits.max_bytes * self.limits.low_watermark
        under_low = stored + reserved + reserve <= low
        return under_low and self._free_bytes() - reserve >= self.limits.min_free_bytes

    def evict_if_needed(self, reserve: int = 0) -> int:
        """Evict least recently used, unpinned blobs down to the low watermark
        once usage (plus ``reserve`` and fills in progress) passes the high
        watermark, or while free disk minus ``reserve`` is under the floor.

        One process evicts at a time (``locks/evict``); one finding another at it
        leaves the work to it. The evictor first rescans the store, so blobs any
        process committed are candidates and the accounting is exact again.
        """
        if not self._needs_eviction(reserve):
            return 0
        with store_lock(self.lock_dir / "evict") as held:
            if not held:
                return 0
            self._resync()
            if not self._needs_eviction(reserve):
                return 0
            freed = 0
            # Least recently used first; pinned blobs (here or in another process)
            # are skipped, never waited for.
            for name in list(self._index):
                if self._evicted_enough(reserve):
                    break
                if name in self._pins:
                    continue
                size = self._evict(name)
                if size is not None:
                    freed += size
        if freed:
            log.info("evicted %d bytes; cache now holds %d bytes", freed, self.total_bytes)
        return freed

    def _evict(self, hex_name: str) -> int | None:
        """Remove one blob unless another reader holds it; the bytes freed, or None."""
        path = self.blob_dir / hex_name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(hex_name)
            return None
        try:
            if not try_flock(fd) or not same_file(fd, path):
                return None  # pinned by a reader, or replaced meanwhile
            size = os.fstat(fd).st_size
            os.unlink(path)
        finally:
            os.close(fd)
        self._forget(hex_name)
        self._usage.add(stored=-size)
        self.evicted += 1
        return size

    def _free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    # -- scrub and quarantine ------------------------------------------------------

    @contextlib.contextmanager
    def scrubbing(self) -> Iterator[bool]:
        """Hold the store-wide scrub lock for the block; yields False (holding
        nothing) while another process scrubs."""
        with store_lock(self.lock_dir / "scrub") as held:
            yield held

    def digests(self) -> Iterator[Digest]:
        """A snapshot of stored digests, least recently used first."""
        for name in list(self._index):
            yield Digest("sha256", name)

    def is_pinned(self, digest: Digest) -> bool:
        return digest.hex in self._pins

    def quarantine(self, digest: Digest, reason: str) -> bool:
        """Take a blob out of service: it is never served again, by any process (a
        later pull fetches and verifies it afresh). False if it was no longer stored."""
        self._forget(digest.hex)
        source = self.blob_dir / digest.hex
        target = self.quarantine_dir / f"{digest.hex}.{time.time_ns()}"
        try:
            size = os.stat(source).st_size
            os.replace(source, target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            # Could not move it aside: delete it rather than leave it servable.
            log.error("cannot move %s to quarantine (%s); deleting it", source, exc)
            try:
                os.unlink(source)
            except FileNotFoundError:
                return False
            except OSError:
                pass
        self._usage.add(stored=-size)
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
