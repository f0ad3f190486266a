"""The blob store seam: where blobs that passed their digest check are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from proxy.oci.digest import Digest


class BlobStore(Protocol):
    """What the pipeline needs of a store. ``caching`` False means: stream only."""

    caching: bool

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

    def has_room_for(self, size: int | None) -> bool:
        """Whether a fill of ``size`` bytes may start (disk floor respected)."""


class BlobSink(Protocol):
    """Where a blob body goes: the client connection."""

    async def write(self, data: bytes | memoryview) -> None:
        """Send bytes held in memory."""

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` (zero-copy)."""


class NoStore:
    """Keeps nothing: every blob is streamed from upstream."""

    caching = False

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

    def has_room_for(self, size: int | None) -> bool:
        return False
