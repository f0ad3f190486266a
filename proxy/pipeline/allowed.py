"""What verified manifests allow, in one process's memory.

The gate decides; this records what each allowing decision lets through (the blobs of a
manifest, or the child manifests a verified index covers), per repository, so that a
digest verified in one repository is no oracle for another. Sibling worker processes
meet in ``proxy.pipeline.shared``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.oci.digest import Digest
from proxy.oci.manifest import ArtifactKind
from proxy.pipeline.gate import RepoKey

MAX_ALLOWED_MANIFESTS = 16384
MAX_ALLOWED_ENTRIES = 131072


@dataclass(slots=True)
class _Entry:
    digests: frozenset[Digest]
    artifact: ArtifactKind | None
    fingerprint: str


class Allowances:
    """What allowed manifests let through, per repository.

    Each (repository, manifest) records the digests it allows; a digest is allowed in a
    repository while any recorded manifest of that repository lists it. Bounded: the
    least recently checked manifests go first.
    """

    def __init__(
        self, *, max_manifests: int = MAX_ALLOWED_MANIFESTS, max_entries: int = MAX_ALLOWED_ENTRIES
    ) -> None:
        self._manifests: OrderedDict[tuple[RepoKey, Digest], _Entry] = OrderedDict()
        self._counts: dict[tuple[RepoKey, Digest], int] = {}
        self._entries = 0
        self._max_manifests = max_manifests
        self._max_entries = max_entries

    def holds(self, repo: RepoKey, manifest: Digest, fingerprint: str) -> bool:
        """Whether ``manifest`` is recorded with ``fingerprint`` (marking it recently used)."""
        key = (repo, manifest)
        entry = self._manifests.get(key)
        if entry is None or entry.fingerprint != fingerprint:
            return False
        self._manifests.move_to_end(key)
        return True

    def record(
        self,
        repo: RepoKey,
        manifest: Digest,
        digests: Iterable[Digest],
        *,
        artifact: ArtifactKind | None = None,
        fingerprint: str = "",
    ) -> None:
        """Allow ``digests`` in ``repo`` on behalf of ``manifest``."""
        key = (repo, manifest)
        if key in self._manifests:
            self._drop(key)
        entry = _Entry(frozenset(digests), artifact, fingerprint)
        self._manifests[key] = entry
        for digest in entry.digests:
            counted = (repo, digest)
            self._counts[counted] = self._counts.get(counted, 0) + 1
        self._entries += len(entry.digests)
        # Evict the least recently used, but never the entry just recorded.
        while len(self._manifests) > 1 and (
            len(self._manifests) > self._max_manifests or self._entries > self._max_entries
        ):
            self._drop(next(iter(self._manifests)))

    def revoke(self, repo: RepoKey, manifest: Digest) -> bool:
        """Forget what ``manifest`` allowed in ``repo``; False if it allowed nothing."""
        key = (repo, manifest)
        if key not in self._manifests:
            return False
        self._drop(key)
        return True

    def _drop(self, key: tuple[RepoKey, Digest]) -> None:
        entry = self._manifests.pop(key)
        repo = key[0]
        for digest in entry.digests:
            counted = (repo, digest)
            left = self._counts[counted] - 1
            if left:
                self._counts[counted] = left
            else:
                del self._counts[counted]
        self._entries -= len(entry.digests)

    def __contains__(self, item: tuple[RepoKey, Digest]) -> bool:
        return item in self._counts

    def retain(self, keep: Iterable[tuple[RepoKey, Digest]]) -> None:
        """Drop every recorded manifest not in ``keep``."""
        kept = set(keep)
        for key in [k for k in self._manifests if k not in kept]:
            self._drop(key)

    def clear(self) -> None:
        """Forget everything."""
        self._manifests.clear()
        self._counts.clear()
        self._entries = 0

    def entries(self) -> list[tuple[RepoKey, Digest, ArtifactKind | None, str]]:
        """(repo, manifest, artifact kind, fingerprint) of every recorded manifest."""
        return [(k[0], k[1], e.artifact, e.fingerprint) for k, e in self._manifests.items()]

    def __len__(self) -> int:
        return len(self._manifests)
