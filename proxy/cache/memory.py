"""In-memory stores: nothing survives ``close`` or a restart.

``MemoryBlobStore`` keeps blobs as files in a private directory on a memory-backed
filesystem (``/dev/shm`` where it exists, else the system temp directory), not as
``bytes`` objects: the pipeline serves a hit by path with sendfile, and a fill writes
its ingest file with ``pwrite`` at any offset, so every blob must be a real file. The
index, pins and reservations live in this object only; the directory is removed on
``close`` (or when the store is collected). It keeps the same budget as the disk store
(``CacheLimits``: watermarks, and a free-space floor on the filesystem holding it) and
is written independently of it, as the second implementation the conformance suite
checks ``BlobStore`` against.

``MemoryVerifiedManifests`` keeps verified manifests and tag resolutions in dicts,
verdicts as JSON text (what a disk record round-trips is what this one does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.cache import FillLease, SoleLease
from proxy.cache.disk import CacheLimits
from proxy.cache.ingest import FillFiles
from proxy.cache.verified import RecentVerdict, StoredManifest, StoredTag, allowed_at
from proxy.oci.digest import Digest

log = logging.getLogger("pullgate.cache")

SHM = Path("/dev/shm")


class MemoryBlobStore:
    """``BlobStore`` in a private memory-backed directory, LRU-evicted under a budget."""

    caching = True

    def __init__(self, *, limits: CacheLimits, parent: Path | None = None) -> None:
        self.limits = limits
        self.root = Path(tempfile.mkdtemp(prefix="pullgate-mem-", dir=parent or _memory_dir()))
        self.blob_dir = self.root / "blobs"
        self.ingest_dir = self.root / "ingest"
        self.blob_dir.mkdir()
        self.ingest_dir.mkdir()
        self._index: OrderedDict[str, int] = OrderedDict()  # hex -> size, LRU first
        self._pins: dict[str, int] = {}
        self._ingest_serial = 0
        self.total_bytes = 0
        self.reserved_bytes = 0
        self.evicted = 0
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def close(self) -> None:
        """Drop every blob and the private directory."""
        self._index.clear()
        self.total_bytes = 0
        self._remove_dir()

    def accepts(self, digest: Digest) -> bool:
        """sha256 only, like the disk store, so both behave alike under the pipeline."""
        return digest.algorithm == "sha256"

    def path_of(self, digest: Digest) -> Path | None:
        if digest.algorithm != "sha256" or digest.hex not in self._index:
            return None
        self._index.move_to_end(digest.hex)
        return self.blob_dir / digest.hex

    def new_ingest(self, digest: Digest) -> Path:
        self._ingest_serial += 1
        return self.ingest_dir / f"{digest.hex}.{self._ingest_serial}"

    def claim_fill(self, digest: Digest) -> FillLease | None:
        return SoleLease()  # a private directory: no other process fills here

    def fill_files(self, digest: Digest) -> FillFiles:
        raise RuntimeError("the memory store is not shared: there is no fill to follow")

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        if not self.accepts(digest):
            raise ValueError(f"the memory store keeps sha256 blobs only, not {digest.algorithm}")
        final = self.blob_dir / digest.hex
        os.replace(ingest_path, final)
        self.total_bytes += size - self._index.get(digest.hex, 0)
        self._index[digest.hex] = size
        self._index.move_to_end(digest.hex)
        self._evict(reserve=0)
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
        needed = size or 0
        if needed > self.limits.max_bytes * self.limits.high_watermark:
            return False
        self._evict(reserve=needed)
        if self._free_bytes() - needed < self.limits.min_free_bytes:
            return False
        self.reserved_bytes += needed
        return True

    def release(self, size: int | None) -> None:
        self.reserved_bytes = max(0, self.reserved_bytes - (size or 0))

    def __len__(self) -> int:
        return len(self._index)

    def _evict(self, *, reserve: int) -> None:
        """Past the high watermark (counting reservations) or under the free-space
        floor: drop least recently used, unpinned blobs until under the low watermark
        and above the floor, or until only pinned blobs are left."""
        limits = self.limits
        pending = reserve + self.reserved_bytes

        def over(mark: float) -> bool:
            return self.total_bytes + pending > limits.max_bytes * mark

        def under_floor() -> bool:
            return self._free_bytes() - reserve < limits.min_free_bytes

        if not over(limits.high_watermark) and not under_floor():
            return
        for name in [n for n in self._index if n not in self._pins]:
            if not over(limits.low_watermark) and not under_floor():
                break
            size = self._index.pop(name)
            (self.blob_dir / name).unlink(missing_ok=True)
            self.total_bytes -= size
            self.evicted += 1

    def _free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0


class MemoryVerifiedManifests:
    """``VerifiedManifestStore`` in dicts."""

    def __init__(self) -> None:
        # digest -> (raw bytes, media type, {repo: verdict as JSON text})
        self._manifests: dict[Digest, tuple[bytes, str, dict[str, str]]] = {}
        self._tags: dict[tuple[str, str], StoredTag] = {}

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        try:
            record = json.dumps(dict(verdict), sort_keys=True)
        except (TypeError, ValueError) as exc:
            log.warning("could not store manifest %s: %s", digest, exc)
            return
        _, _, verdicts = self._manifests.get(digest, (raw, media_type, {}))
        verdicts[repo] = record
        self._manifests[digest] = (raw, media_type, verdicts)

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        found = self._manifests.get(digest)
        if found is None or not digest.matches(found[0]):
            return None
        raw, media_type, verdicts = found
        return StoredManifest(
            digest=digest,
            raw=raw,
            media_type=media_type,
            verdicts={repo: json.loads(text) for repo, text in verdicts.items()},
        )

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        found: list[RecentVerdict] = []
        for digest, (_, media_type, verdicts) in self._manifests.items():
            for repo, text in verdicts.items():
                verified_at = allowed_at(json.loads(text))
                if verified_at is not None and verified_at >= since:
                    found.append(RecentVerdict(digest, repo, media_type, verified_at))
        found.sort(key=lambda v: v.verified_at, reverse=True)
        return found[:limit]

    def put_tag(self, repo: str, tag: str, digest: Digest, resolved_at: float) -> None:
        self._tags[(repo, tag)] = StoredTag(digest=digest, resolved_at=float(resolved_at))

    def get_tag(self, repo: str, tag: str) -> StoredTag | None:
        return self._tags.get((repo, tag))


def _memory_dir() -> Path | None:
    """``/dev/shm`` when it is a writable directory; else None (the temp directory)."""
    if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
        return SHM
    return None
