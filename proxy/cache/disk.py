"""The node-local content-addressed store, meant for a hostPath on NVMe.

Layout under ``root``::

    blobs/sha256/<hex>       verified blobs (entered only after their digest matched)
    ingest/<hex>.<token>     downloads in progress (removed at startup)
    manifests/sha256/<hex>   verified manifests, with ``<hex>.json`` verdict metadata
    quarantine/<hex>.<time>  blobs the scrub found corrupt

The index is in memory: an LRU ordered dict (O(1) touch and evict), rebuilt from one
directory listing at startup. Blobs being read or filled are pinned and never evicted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        self.manifest_dir = root / "manifests" / "sha256"
        self.quarantine_dir = root / "quarantine"
        self._index: OrderedDict[str, int] = OrderedDict()  # hex -> size, LRU first
        self._pins: dict[str, int] = {}
        self.total_bytes = 0
        self.evicted = 0
        self.quarantined = 0

    # -- startup -------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Create the layout, drop leftover ingest files, rebuild the index."""
        started = time.perf_counter()
        for directory in (self.blob_dir, self.ingest_dir, self.manifest_dir, self.quarantine_dir):
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

    def has_room_for(self, size: int | None) -> bool:
        """Whether a fill of ``size`` bytes fits above the free-disk floor."""
        free = shutil.disk_usage(self.root).free
        return free - (size or 0) >= self.limits.min_free_bytes

    # -- eviction ------------------------------------------------------------------

    def evict_if_needed(self, reserve: int = 0) -> int:
        """Evict least recently used, unpinned blobs down to the low watermark
        once usage passes the high watermark (or free disk drops under the floor)."""
        high = self.limits.max_bytes * self.limits.high_watermark
        low = self.limits.max_bytes * self.limits.low_watermark
        over_budget = self.total_bytes + reserve > high
        under_floor = self._free_bytes() < self.limits.min_free_bytes
        if not over_budget and not under_floor:
            return 0
        freed = 0
        for name in list(self._index):
            if (
                self.total_bytes + reserve <= low
                and self._free_bytes() >= self.limits.min_free_bytes
            ):
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

    def quarantine(self, digest: Digest, reason: str) -> None:
        """Take a blob out of service: it will never be served again."""
        size = self._index.pop(digest.hex, None)
        if size is not None:
            self.total_bytes -= size
        source = self.blob_dir / digest.hex
        target = self.quarantine_dir / f"{digest.hex}.{int(time.time())}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(source, target)
        self.quarantined += 1
        log.error("quarantined blob %s: %s (moved to %s)", digest, reason, target)

    # -- manifests -----------------------------------------------------------------

    def put_manifest(self, digest: Digest, raw: bytes, meta: dict[str, Any]) -> None:
        path = self.manifest_dir / digest.hex
        tmp = self.ingest_dir / f"m-{digest.hex}.{secrets.token_hex(6)}"
        try:
            tmp.write_bytes(raw)
            os.replace(tmp, path)
            (self.manifest_dir / f"{digest.hex}.json").write_text(json.dumps(meta))
        except OSError as exc:
            log.warning("could not store manifest %s: %s", digest, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def get_manifest(self, digest: Digest) -> tuple[bytes, dict[str, Any]] | None:
        try:
            raw = (self.manifest_dir / digest.hex).read_bytes()
            meta = json.loads((self.manifest_dir / f"{digest.hex}.json").read_text())
        except (OSError, ValueError):
            return None
        if not digest.matches(raw) or not isinstance(meta, dict):
            return None
        return raw, meta

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
