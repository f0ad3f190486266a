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


class Allowances:
    """What allowed manifests let through, per repository.

    Each (repository, manifest) records the digests it allows, once per decider (the
    fingerprint of what allowed it: one manifest may be allowed by a pod's scope and by
    the scope for everyone, and each keeps its own record). A digest is allowed in a
    repository while any record of that repository lists it. Bounded: the least recently
    checked manifests go first.
    """

    def __init__(
        self, *, max_manifests: int = MAX_ALLOWED_MANIFESTS, max_entries: int = MAX_ALLOWED_ENTRIES
    ) -> None:
        self._manifests: OrderedDict[tuple[RepoKey, Digest], dict[str, _Entry]] = OrderedDict()
        self._counts: dict[tuple[RepoKey, Digest], int] = {}
        self._entries = 0
        self._max_manifests = max_manifests
        self._max_entries = max_entries

    def holds(self, repo: RepoKey, manifest: Digest, fingerprint: str) -> bool:
        """Whether ``manifest`` is recorded with ``fingerprint`` (marking it recently used)."""
        key = (repo, manifest)
        deciders = self._manifests.get(key)
        if deciders is None or fingerprint not in deciders:
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
        """Allow ``digests`` in ``repo`` on behalf of ``manifest``, as decided by
        ``fingerprint`` (replacing only that decider's record)."""
        key = (repo, manifest)
        deciders = self._manifests.setdefault(key, {})
        self._manifests.move_to_end(key)
        old = deciders.pop(fingerprint, None)
        if old is not None:
            self._count(repo, old, -1)
        entry = _Entry(frozenset(digests), artifact)
        deciders[fingerprint] = entry
        self._count(repo, entry, 1)
        # Evict the least recently used, but never the manifest just recorded.
        while len(self._manifests) > 1 and (
            len(self._manifests) > self._max_manifests or self._entries > self._max_entries
        ):
            self._drop(next(iter(self._manifests)))

    def revoke(self, repo: RepoKey, manifest: Digest) -> bool:
        """Forget what ``manifest`` allowed in ``repo``, whoever decided it; False if it
        allowed nothing."""
        key = (repo, manifest)
        if key not in self._manifests:
            return False
        self._drop(key)
        return True

    def _count(self, repo: RepoKey, entry: _Entry, step: int) -> None:
        for digest in entry.digests:
            counted = (repo, digest)
            left = self._counts.get(counted, 0) + step
            if left:
                self._counts[counted] = left
            else:
                del self._counts[counted]
        self._entries += step * len(entry.digests)

    def _drop(self, key: tuple[RepoKey, Digest]) -> None:
        for entry in self._manifests.pop(key).values():
            self._count(key[0], entry, -1)

    def __contains__(self, item: tuple[RepoKey, Digest]) -> bool:
        return item in self._counts

    def holders(
        self, repo: RepoKey, digest: Digest
    ) -> list[tuple[Digest, ArtifactKind | None, str]]:
        """(manifest, artifact kind, fingerprint) of each record in ``repo`` that lists
        ``digest``. A scan (coverage lookups only: one per child manifest requested)."""
        if (repo, digest) not in self._counts:
            return []
        return [
            (manifest, entry.artifact, fingerprint)
            for (in_repo, manifest), deciders in self._manifests.items()
            if in_repo == repo
            for fingerprint, entry in deciders.items()
            if digest in entry.digests
        ]

    def retain(self, keep: Iterable[tuple[RepoKey, Digest, str]]) -> None:
        """Drop every record (repository, manifest, fingerprint) not in ``keep``."""
        kept = set(keep)
        for key in list(self._manifests):
            deciders = self._manifests[key]
            for fingerprint in [f for f in deciders if (*key, f) not in kept]:
                self._count(key[0], deciders.pop(fingerprint), -1)
            if not deciders:
                del self._manifests[key]

    def clear(self) -> None:
        """Forget everything."""
        self._manifests.clear()
        self._counts.clear()
        self._entries = 0

    def entries(self) -> list[tuple[RepoKey, Digest, ArtifactKind | None, str]]:
        """(repo, manifest, artifact kind, fingerprint) of every record."""
        return [
            (repo, manifest, entry.artifact, fingerprint)
            for (repo, manifest), deciders in self._manifests.items()
            for fingerprint, entry in deciders.items()
        ]

    def __len__(self) -> int:
        return len(self._manifests)
