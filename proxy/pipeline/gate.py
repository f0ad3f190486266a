"""The verification seam: one place decides whether a manifest may be served.

The pipeline calls ``Gate.check_manifest`` for every manifest before serving it, and
``Gate.blob_allowed`` for every blob. The gate records which blobs each verified
manifest allows, per (registry, repository).

``AllowAllGate`` is the mirror-core default; the signature gate in ``proxy.verify``
implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest
from proxy.pipeline.tarcheck import LayerPlan


@dataclass(frozen=True, slots=True)
class RepoKey:
    registry: str
    repository: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass(frozen=True, slots=True)
class Pod:
    """The pod a CRI pull is for, from kubelet's sandbox metadata: what policy scopes
    for pods (``namespaces``, ``podLabels``) match."""

    namespace: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, namespace: str, labels: Mapping[str, str]) -> Pod:
        return cls(namespace, tuple(sorted(labels.items())))

    def has_labels(self, wanted: tuple[tuple[str, str], ...]) -> bool:
        return set(wanted) <= set(self.labels)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one manifest digest."""

    allowed: bool
    reason: str
    scope: str = ""
    mode: str = "enforce"
    details: tuple[str, ...] = field(default_factory=tuple)
    reason_class: str = ""
    """What decided it, for metrics: verified, index, unverified, warn, refused,
    deadline, no_scope, no_policy ("" when unknown)."""


class ArtifactSource(Protocol):
    """What a gate may fetch from the upstream of one repository while verifying.

    All fetches are size-capped by the caller-given limit and never served to clients.
    """

    async def manifest(self, reference: str, *, max_bytes: int) -> Manifest | None:
        """The manifest at tag or digest ``reference``, or None if it does not exist."""

    async def blob(self, digest: Digest, *, max_bytes: int) -> bytes:
        """A small blob (signature payload, bundle), digest-checked."""

    async def referrers(self, digest: Digest, artifact_type: str | None = None) -> Manifest | None:
        """The referrers index of ``digest`` (API or fallback tag), or None."""

    def expect_layer_files(self, digest: Digest, plan: LayerPlan) -> None:
        """Serve layer ``digest`` only through ``plan``'s per-file check (a verified
        model signature lists the files of this tar layer)."""


class Gate(Protocol):
    """What the pipeline asks of a gate: decisions, and the state it keeps alongside."""

    @property
    def policy_in_force(self) -> bool:
        """Whether a signature policy decides (False: everything is allowed anyway)."""

    @property
    def revision(self) -> str:
        """The revision of the policy in force ("" without one); a verdict stored under
        another revision is not served when the upstream is down."""

    @property
    def positive_ttl(self) -> float | None:
        """Seconds an allowing verdict stays good (0: not kept); None: forever."""

    @property
    def pod_scoped(self) -> bool:
        """Whether decisions may differ by pod (a scope names namespaces or labels)."""

    async def check_manifest(
        self,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        *,
        pod: Pod | None = None,
    ) -> Verdict:
        """Decide whether ``manifest`` may be served from ``repo``, for ``pod`` (None:
        no pod context).

        On an allowing verdict, the gate records the blobs and child manifests the
        manifest references, so ``blob_allowed``/``child_allowed`` accept them.
        """

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        """Whether a verified manifest of ``repo`` references blob ``digest``."""


class AllowAllGate:
    """Serves everything. The mirror core's default until a policy is configured."""

    policy_in_force = False
    revision = ""
    positive_ttl: float | None = None
    pod_scoped = False

    async def check_manifest(
        self,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        *,
        pod: Pod | None = None,
    ) -> Verdict:
        return Verdict(
            allowed=True,
            reason="no policy configured (allow-all)",
            mode="allow",
            reason_class="no_policy",
        )

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        return True


VerdictHook = Callable[[RepoKey, Manifest, Verdict], Awaitable[None]]
