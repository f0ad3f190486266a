"""The verified-manifest seam: what this node decided, kept for when the upstream is down.

Three records, all written after the gate allowed a manifest and read back only to
serve content verified earlier (offline serving, the restart restore):

- the manifest's exact bytes, with one verdict per repository it was allowed for;
- which tag resolved to which verified digest, and when;
- a listing of recent allowing verdicts (startup only).

Blobs live elsewhere (``proxy.cache.BlobStore``): a store of verified manifests is
small, never evicted, and useful even where blobs are not kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.oci.digest import Digest


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A verified manifest: its exact bytes and a verdict per repository."""

    digest: Digest
    raw: bytes
    media_type: str
    # "registry/repository" -> verdict metadata (allowed, reason, mode, verifiedAt, ...)
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


class VerifiedManifestStore(Protocol):
    """Verified manifests with their verdicts, and tag resolutions.

    Methods block (file IO): the pipeline calls them in its executor. Writes never
    raise for IO trouble (a manifest that could not be kept is only a lost fallback);
    reads return None (or nothing) for anything missing, torn or not well formed.
    """

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        """Keep a manifest that passed the gate for ``repo``, with its (JSON-able)
        verdict; a later verdict for the same ``repo`` replaces the earlier one."""

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        """A stored verified manifest (bytes re-checked against ``digest``), or None."""

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        """Allowing verdicts whose ``verifiedAt`` is at or after ``since``, newest
        first, at most ``limit`` (read at startup, never on the request path)."""

    def put_tag(self, repo: str, tag: str, digest: Digest, resolved_at: float) -> None:
        """Remember that ``repo:tag`` resolved to verified ``digest`` at ``resolved_at``."""

    def get_tag(self, repo: str, tag: str) -> StoredTag | None:
        """The last verified resolution of ``repo:tag``, or None."""


class NoVerifiedManifests:
    """Keeps nothing: without a store, an unreachable upstream means no fallback."""

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


def allowed_at(verdict: Mapping[str, Any]) -> float | None:
    """When an allowing verdict record was reached, or None if it does not allow."""
    verified_at = verdict.get("verifiedAt")
    if verdict.get("allowed") is not True or not isinstance(verified_at, (int, float)):
        return None
    if isinstance(verified_at, bool):
        return None
    return float(verified_at)
