"""Which blobs may be served: the gate's allowances, and those of manifests served
from the store while the upstream was down (shared with sibling worker processes).

A blob is served only when a verified manifest of the same repository references it.
After a restart, a blob that the background restore may still allow waits for it (at
most ``RESTORE_WAIT`` seconds) before it is refused.

The sizes those manifests' descriptors give their blobs are kept too
(``record_sizes``), so an uncached upstream body is bound to the verified size
(``expected_sizes``) rather than to whatever length the upstream announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import BlobNotAllowed
from proxy.oci.manifest import Manifest
from proxy.pipeline.gate import Gate, RepoKey
from proxy.pipeline.shared import OFFLINE, SharedAllowances
from proxy.upstream.router import Route

log = logging.getLogger("pullgate.pipeline")

# Blobs allowed by manifests served from the store while the upstream was down.
OFFLINE_ALLOWED_ENTRIES = 65536
# How long a blob request that would be refused waits for the restart restore.
RESTORE_WAIT = 30.0
# Blob sizes remembered from served manifests (least recently used first out).
BLOB_SIZE_ENTRIES = 131072
# Different sizes kept for one blob (served manifests that disagree on it): the first
# ones; a manifest giving yet another is not believed for it (its length is refused).
BLOB_SIZES_PER_BLOB = 8


class BlobAllowances:
    """The blob-side question of the gate, with the offline and restart cases."""

    def __init__(
        self, *, gate: Gate, metrics: Metrics, shared: SharedAllowances | None = None
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        # The node's allowances shared with sibling worker processes (None: no siblings):
        # what this worker served offline lets them serve its blobs too.
        self.shared = shared
        self._offline_allowed: OrderedDict[tuple[str, str, Digest], None] = OrderedDict()
        # The restart restore in progress (or done), this process's or a sibling's.
        self.restoring: asyncio.Task[int] | None = None
        # (registry, repository, blob) -> the sizes served manifests give it.
        self._sizes: OrderedDict[tuple[str, str, Digest], frozenset[int]] = OrderedDict()

    def record_sizes(self, repo: RepoKey, manifest: Manifest) -> None:
        """Remember the size each descriptor of ``manifest`` (served from ``repo``
        after the gate allowed it) gives its blob, here and for sibling workers."""
        descriptors = list(manifest.layers)
        if manifest.config is not None:
            descriptors.append(manifest.config)
        new: list[tuple[Digest, int]] = []
        ignored = 0
        for descriptor in descriptors:
            key = (repo.registry, repo.repository, descriptor.digest)
            known = self._sizes.get(key, frozenset())
            if descriptor.size not in known:
                if len(known) >= BLOB_SIZES_PER_BLOB:
                    ignored += 1
                    continue
                self._sizes[key] = known | {descriptor.size}
                new.append((descriptor.digest, descriptor.size))
            self._sizes.move_to_end(key)
        if ignored:
            log.warning(
                "%s@%s gives %d blobs yet another size beyond the %d kept for each; "
                "not believed (such a length is refused)",
                repo,
                manifest.digest,
                ignored,
                BLOB_SIZES_PER_BLOB,
            )
        while len(self._sizes) > BLOB_SIZE_ENTRIES:
            self._sizes.popitem(last=False)
        if new and self.shared is not None:
            try:
                self.shared.record_sizes(repo, new)
            except Exception:  # sharing is best effort: siblings then keep today's bound
                log.exception("could not share the blob sizes of %s@%s", repo, manifest.digest)

    def expected_sizes(self, route: Route, repository: str, digest: Digest) -> frozenset[int]:
        """The sizes the served manifests of the repository give blob ``digest``
        (usually one), or none when not known: without a policy (allow-all) a blob is
        often fetched without its manifest passing through this node. Two served
        manifests that disagree on it give both: one of them is wrong and the digest
        check decides, but a length neither gives is still refused (a disagreement
        must not lift the bound). None known keeps the upstream's length as the bound,
        as before this check existed."""
        key = (route.registry, repository, digest)
        sizes = self._sizes.get(key)
        if sizes is None and self.shared is not None:
            try:
                sizes = self.shared.blob_sizes(RepoKey(route.registry, repository), digest)
            except Exception:
                log.exception("could not read the shared size of blob %s", digest)
                sizes = frozenset()
            if sizes:
                self._sizes[key] = sizes
        if not sizes:
            return frozenset()
        if len(sizes) != 1:
            log.warning(
                "served manifests of %s/%s give blob %s several sizes %s",
                route.registry,
                repository,
                digest,
                sorted(sizes),
            )
        self._sizes.move_to_end(key)
        return sizes

    def allow_offline(self, repo: RepoKey, manifest: Manifest, verified_at: float) -> None:
        """Allow the blobs of ``manifest``, served from the store while the upstream is
        down (bounded, least recently allowed first out), here and in siblings."""
        for blob in manifest.blob_digests:
            key = (repo.registry, repo.repository, blob)
            self._offline_allowed[key] = None
            self._offline_allowed.move_to_end(key)
        while len(self._offline_allowed) > OFFLINE_ALLOWED_ENTRIES:
            self._offline_allowed.popitem(last=False)
        if self.shared is not None:
            self._share_offline(repo, manifest, verified_at)

    async def require(self, route: Route, repository: str, digest: Digest) -> None:
        """``check``, but a blob the restart restore may still allow waits
        for it (at most ``RESTORE_WAIT`` seconds) before being refused."""
        restoring = self.restoring
        if (
            restoring is not None
            and not restoring.done()
            and not self.allowed(route, repository, digest)
        ):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(restoring), RESTORE_WAIT)
        self.check(route, repository, digest)

    def allowed(self, route: Route, repository: str, digest: Digest) -> bool:
        repo = RepoKey(route.registry, repository)
        offline_key = (route.registry, repository, digest)
        return (
            self.gate.blob_allowed(repo, digest)
            or offline_key in self._offline_allowed
            or self._shared_offline(repo, digest)
        )

    def _share_offline(self, repo: RepoKey, manifest: Manifest, verified_at: float) -> None:
        """Let sibling workers serve the blobs of a manifest served offline here."""
        assert self.shared is not None
        try:
            self.shared.record(
                repo,
                manifest.digest,
                {OFFLINE: manifest.blob_digests},
                artifact=manifest.kind,
                fingerprint="",
                revision=self.gate.revision,
                decided_at=verified_at,
                decision="{}",
            )
        except Exception:
            log.exception("could not share the offline allowances of %s@%s", repo, manifest.digest)

    def _shared_offline(self, repo: RepoKey, digest: Digest) -> bool:
        """A sibling served, offline and under the policy revision in force here, a
        manifest of ``repo`` that references ``digest``."""
        if self.shared is None:
            return False
        revision = self.gate.revision
        return any(g.revision == revision for g in self.shared.grants_for(OFFLINE, repo, digest))

    def check(self, route: Route, repository: str, digest: Digest) -> None:
        repo = RepoKey(route.registry, repository)
        if not self.allowed(route, repository, digest):
            self.metrics.denied.labels("blob", "mirror").inc()
            raise BlobNotAllowed(
                f"blob {digest} is not referenced by any verified manifest of {repo}; "
                "pull a verified manifest that references it first"
            )
