"""The pipeline reads gate state only through the ``Gate`` protocol.

A gate written against the protocol alone (no ``policy`` attribute, unlike
``SignatureGate``) must get the same treatment: its verdict TTL, its revision and
whether a policy is in force.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.cache.verified import NoVerifiedManifests, RecentVerdict
from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest
from proxy.oci.reference import ManifestRef
from proxy.pipeline.gate import AllowAllGate, ArtifactSource, Gate, Pod, RepoKey, Verdict
from proxy.verify.base import Limits
from proxy.verify.policy import Policy
from proxy.verify.signature_gate import SignatureGate
from tests.support.inprocess import (
    FakeRegistry,
    Image,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)


@dataclass
class ProtocolGate:
    """Allows every manifest and records its blobs; declares only what ``Gate`` does."""

    policy_in_force: bool = True
    revision: str = "rev-7"
    positive_ttl: float | None = 300.0
    pod_scoped: bool = False
    allowed: set[tuple[RepoKey, Digest]] = field(default_factory=set)

    async def check_manifest(
        self,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        *,
        pod: Pod | None = None,
    ) -> Verdict:
        self.allowed.update((repo, d) for d in manifest.blob_digests)
        return Verdict(allowed=True, reason="allowed by the test gate")

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        return (repo, digest) in self.allowed


class RecordingStore(NoVerifiedManifests):
    """Keeps nothing, but records what the pipeline asks of its verified manifests."""

    def __init__(self) -> None:
        self.verdicts: list[Mapping[str, Any]] = []
        self.recent_asked = asyncio.Event()

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        self.verdicts.append(verdict)

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        self.recent_asked.set()
        return []


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def image(upstream: FakeRegistry) -> Image:
    return upstream.add_image("app/web", "1.0", b"a layer")


@pytest.fixture
async def upstream_url(upstream: FakeRegistry, image: Image) -> AsyncIterator[str]:
    async with serve_fake_registry(upstream) as url:
        yield url


def test_both_gates_declare_the_gate_protocol() -> None:
    policy = Policy(
        default="deny",
        scopes=(),
        limits=Limits(),
        positive_ttl=42.0,
        negative_ttl=3.0,
        revision="r" * 64,
        source="<test>",
    )
    gates: list[Gate] = [AllowAllGate(), SignatureGate(policy), ProtocolGate()]
    allow_all, signature, _ = gates
    assert (allow_all.policy_in_force, allow_all.revision, allow_all.positive_ttl) == (
        False,
        "",
        None,
    )
    assert (signature.policy_in_force, signature.revision, signature.positive_ttl) == (
        True,
        "r" * 64,
        42.0,
    )


async def test_stored_verdict_carries_the_gate_revision(upstream_url: str) -> None:
    store = RecordingStore()
    gate = ProtocolGate(revision="rev-42")
    async with start_mirror(mirror_config(upstream_url), gate=gate, manifests=store) as mirror:
        await mirror.pipeline.get_manifest(mirror.route(), "app/web", ManifestRef(tag="1.0"))
    (verdict,) = store.verdicts
    assert verdict["policyRevision"] == "rev-42"


@pytest.mark.parametrize(("ttl", "fetches"), [(0.0, 2), (None, 1)])
async def test_verdict_ttl_comes_from_the_gate(
    upstream_url: str, upstream: FakeRegistry, image: Image, ttl: float | None, fetches: int
) -> None:
    # A manifest asked for by digest is remembered for the gate's positive TTL: with 0
    # it is fetched again, with None (no policy) it is kept.
    gate = ProtocolGate(positive_ttl=ttl)
    async with start_mirror(mirror_config(upstream_url), gate=gate) as mirror:
        ref = ManifestRef(digest=image.digest)
        for _ in range(2):
            served = await mirror.pipeline.get_manifest(mirror.route(), "app/web", ref)
            assert served.manifest.raw == image.manifest
            await asyncio.sleep(0.01)
    by_digest = [
        s for s in upstream.requests_for("manifests") if s.path.endswith(str(image.digest))
    ]
    assert len(by_digest) == fetches


@pytest.mark.parametrize("in_force", [True, False])
async def test_restart_restore_runs_only_with_a_policy_in_force(
    upstream_url: str, in_force: bool
) -> None:
    store = RecordingStore()
    gate = ProtocolGate(policy_in_force=in_force)
    async with start_mirror(mirror_config(upstream_url), gate=gate, manifests=store):
        if in_force:
            await asyncio.wait_for(store.recent_asked.wait(), timeout=10)
        else:
            await asyncio.sleep(0.2)
    assert store.recent_asked.is_set() == in_force
