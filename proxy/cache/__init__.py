"""The blob store seam: where blobs that passed their digest check are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from proxy.oci.digest import Digest


class BlobStore(Protocol):
    def path_of(self, digest: Digest) -> Path | None:
        """The file holding verified blob ``digest``, or None on a miss."""

    def open_ingest(self, digest: Digest) -> IngestWriter | None:
        """Start storing ``digest``; None if this store keeps nothing."""


class IngestWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> None:
        """Called only after the digest matched: make the blob visible."""

    def abort(self) -> None: ...


class NoStore:
    """Keeps nothing: every blob is streamed from upstream."""

    def path_of(self, digest: Digest) -> Path | None:
        return None

    def open_ingest(self, digest: Digest) -> IngestWriter | None:
        return None
