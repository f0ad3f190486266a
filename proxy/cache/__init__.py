"""The blob store seam: where blobs that passed their digest check are kept.

A store is blobs, pins and room: nothing else. Verified manifests, their verdicts and
tag resolutions have their own seam (``proxy.cache.verified``).

Implementations: ``DiskBlobStore`` (``proxy.cache.disk``), ``MemoryBlobStore``
(``proxy.cache.memory``) and ``NoStore`` below; ``tests/unit/cache/
test_store_conformance.py`` is the suite each must pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from proxy.oci.digest import Digest


class BlobStore(Protocol):
    """What the pipeline needs of a store. ``caching`` False means: stream only."""

    caching: bool

    def accepts(self, digest: Digest) -> bool:
        """Whether this store can keep blob ``digest`` at all."""

    def path_of(self, digest: Digest) -> Path | None:
        """The file holding verified blob ``digest``, or None on a miss. A hit counts as
        a use: the blob becomes the most recently used."""

    def new_ingest(self, digest: Digest) -> Path:
        """A fresh path in the ingest area for a download of ``digest``."""

    def commit(self, digest: Digest, ingest_path: Path, size: int) -> Path:
        """Make a verified, fsynced ingest file visible (renamed, not copied); returns
        its final path. Raises ValueError for a digest the store does not accept."""

    def pin(self, digest: Digest) -> None:
        """Protect ``digest`` from eviction while it is read or filled (pins count)."""

    def unpin(self, digest: Digest) -> None:
        """Undo one ``pin``; one too many is harmless."""

    def make_room(self, size: int | None) -> bool:
        """Evict least recently used unpinned blobs as needed and reserve room for a
        fill of ``size`` bytes (None: unknown); reservations count against the budget
        until released. False (nothing reserved) if the blob cannot be kept."""

    def release(self, size: int | None) -> None:
        """Give back a reservation made by a successful ``make_room``."""


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
