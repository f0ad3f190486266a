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
from typing import TYPE_CHECKING, Protocol

from proxy.oci.digest import Digest

if TYPE_CHECKING:
    from proxy.cache.ingest import FillFiles


class FillLease(Protocol):
    """The right to fill one blob: held by one process at a time, among all the
    processes sharing a store."""

    def publish(self, ingest_path: Path, size: int | None) -> None:
        """Tell other processes where the fill writes and the size announced."""

    def release(self) -> None:
        """Give the right up (idempotent), once the ingest file was committed or
        removed."""


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

    def claim_fill(self, digest: Digest) -> FillLease | None:
        """The right to fill ``digest``, or None while another process sharing the
        store fills it (a store no other process shares always grants it)."""

    def fill_files(self, digest: Digest) -> FillFiles:
        """The files of ``digest``'s fill, to follow one another process runs (asked
        only after ``claim_fill`` returned None)."""

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


class SoleLease:
    """The fill lease of a store no other process shares: always granted."""

    def publish(self, ingest_path: Path, size: int | None) -> None:
        pass

    def release(self) -> None:
        pass


class NoStore:
    """Keeps nothing: every blob is streamed from upstream."""

    caching = False

    def accepts(self, digest: Digest) -> bool:
        return False

    def path_of(self, digest: Digest) -> Path | None:
        return None

    def new_ingest(self, digest: Digest) -> Path:
        raise RuntimeError("NoStore keeps nothing")

    def claim_fill(self, digest: Digest) -> FillLease | None:
        return SoleLease()

    def fill_files(self, digest: Digest) -> FillFiles:
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
