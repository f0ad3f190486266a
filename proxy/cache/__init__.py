"""The blob store seam: where blobs that passed their digest check are kept.

Verified manifests are kept too, with the verdict that let them through, so that
content already verified keeps being served while the upstream is down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.oci.digest import Digest


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A verified manifest on disk: its exact bytes and a verdict per repository."""

    digest: Digest
    raw: bytes
    media_type: str
    # "registry/repository" -> verdict metadata (allowed, reason, mode, verified_at, ...)
    verdicts: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class RecentVerdict:
    """A manifest allowed for ``repo`` ("registry/repository") at ``verified_at``."""

    digest: Digest
    repo: str
    media_type: str
    verified_at: float


@dataclass(frozen=True, slots=True)
class StoredTag:
    """The digest a tag last resolved to (and was verified), and when."""

    digest: Digest
    resolved_at: float


class BlobStore(Protocol):
    """What the pipeline needs of a store. ``caching`` False means: stream only."""

    caching: bool

    def accepts(self, digest: Digest) -> bool:
        """Whether this store can keep blob ``digest`` at all."""

    def path_of(self, digest: Digest) -> Path | None:
        """The file holding verified blob ``digest``, or None on a miss."""

    def new_ingest(self, digest: Digest) -> Path:
        """A fresh path in the ingest area for a download of ``digest``."""

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        """Make a verified, fsynced ingest file visible; returns its final path."""

    def pin(self, digest: Digest) -> None:
        """Protect ``digest`` from eviction while it is read or filled."""

    def unpin(self, digest: Digest) -> None:
        """Undo one ``pin``."""

    def make_room(self, size: int | None) -> bool:
        """Evict as needed and reserve room for a fill of ``size`` bytes (None:
        unknown); False if the blob cannot be kept."""

    def release(self, size: int | None) -> None:
        """Give back a reservation made by a successful ``make_room``."""

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        """Keep a manifest that passed the gate for ``repo``, with its verdict."""

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        """A stored verified manifest (bytes re-checked against ``digest``), or None."""

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        """Allowing verdicts recorded at or after ``since``, newest first, at most
        ``limit`` (read at startup, never on the request path)."""

    def put_tag(self, repo: str, tag: str, digest: Digest, resolved_at: float) -> None:
        """Remember that ``repo:tag`` resolved to verified ``digest`` at ``resolved_at``."""

    def get_tag(self, repo: str, tag: str) -> StoredTag | None:
        """The last verified resolution of ``repo:tag``, or None."""


class BlobSink(Protocol):
    """Where a blob body goes: the client connection."""

    async def thread_sender(self) -> Callable[[memoryview], None]:
        """A blocking send for a worker thread to deliver bytes held in memory. Call it
        once, before any other send; nothing else writes to the client meanwhile."""

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` (zero-copy)."""


class NoStore:
    """Keeps nothing: every blob is streamed from upstream."""

    caching = False

    def accepts(self, digest: Digest) -> bool:
        return False

    def path_of(self, digest: Digest) -> Path | None:
        return None

    def new_ingest(self, digest: Digest) -> Path:
        raise RuntimeError("NoStore keeps nothing")

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        raise RuntimeError("NoStore keeps nothing")

    def pin(self, digest: Digest) -> None:
        pass

    def unpin(self, digest: Digest) -> None:
        pass

    def make_room(self, size: int | None) -> bool:
        return False

    def release(self, size: int | None) -> None:
        pass

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        pass

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        return None

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        return []

    def put_tag(self, repo: str, tag: str, digest: Digest, resolved_at: float) -> None:
        pass

    def get_tag(self, repo: str, tag: str) -> StoredTag | None:
        return None
