"""Serving a stored verdict while the upstream is down (``ManifestPath._serve_stored``)
when scopes differ by pod: a verdict reached for one context is not another's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from proxy.cache.disk import CacheLimits
from proxy.cache.memory import MemoryBlobStore, MemoryVerifiedManifests
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.reference import ManifestRef
from proxy.pipeline import Pipeline
from proxy.pipeline.gate import Pod
from proxy.upstream.router import Route
from proxy.verify.policy import parse_policy
from proxy.verify.signature_gate import SignatureGate
from tests.support import cosign_sign as cs
from tests.unit.cache.fakes import FakeUpstream
from tests.unit.verify.manifests import OCI_MANIFEST, image

REGISTRY = "r.test"

POLICY = """\
default: deny
scopes:
  - match: "r.test/app"
    mode: allow
  - match: "r.test/app"
    namespaces: [prod]
    require:
      referrers:
        - artifactType: application/spdx+json
          signedBy: {cosign: {key: keys/sbom.pub}}
"""


class Upstream:
    """``UpstreamClient.get`` over a dict of paths; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.paths: dict[str, FakeUpstream] = {}
        self.down = False

    async def get(self, path: str, *, scope: str, **_: Any) -> Any:
        if self.down:
            raise UpstreamUnavailable("connection refused")
        upstream = self.paths.get(path)
        if upstream is None:
            return await FakeUpstream(b"", status=404).open()
        return await upstream.open()

    async def get_blob(
        self, path: str, *, scope: str, expected_sizes: frozenset[int] = frozenset()
    ) -> Any:
        return await self.get(path, scope=scope)


@pytest.fixture
async def blobs() -> AsyncIterator[MemoryBlobStore]:
    store = MemoryBlobStore(limits=CacheLimits(max_bytes=64 * 1024**2, min_free_bytes=0))
    yield store
    store.close()


async def test_refuses_offline_fallback_to_a_verdict_reached_for_another_pods_scope(
    tmp_path: Path, blobs: MemoryBlobStore
) -> None:
    """Allowed for a mirror pull (mode allow), the manifest is stored; a pod of a
    namespace whose scope requires an SBOM must not get it from that stored verdict
    because the upstream (which the attacker runs) stops answering."""
    cs.generate_key().write_public(tmp_path / "keys" / "sbom.pub")
    policy = parse_policy(POLICY.encode(), base_dir=tmp_path, source="policy.yaml")
    upstream = Upstream()
    manifest = image(b"layer").raw
    digest = Digest.of(manifest)
    upstream.paths[f"/v2/app/manifests/{digest}"] = FakeUpstream(
        manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    route = Route(registry=REGISTRY, client=cast(Any, upstream), explicit_ns=True)
    manifests = MemoryVerifiedManifests()

    def pipeline() -> Pipeline:
        return Pipeline(
            gate=SignatureGate(policy),
            store=blobs,
            manifests=manifests,
            metrics=Metrics(),
            tag_staleness=300.0,
        )

    first = pipeline()
    try:
        served = await first.get_manifest(route, "app", ManifestRef(digest=digest))
        assert served.verdict.allowed and not served.offline
        upstream.down = True
        with pytest.raises(UpstreamUnavailable):
            await first.get_manifest(
                route, "app", ManifestRef(digest=digest), pod=Pod.of("prod", {})
            )
    finally:
        await first.close()
    restarted = pipeline()
    try:
        with pytest.raises(UpstreamUnavailable, match="another pull context"):
            await restarted.get_manifest(
                route, "app", ManifestRef(digest=digest), pod=Pod.of("prod", {})
            )
        # The context it was reached for (no pod) still gets it from the store.
        again = await restarted.get_manifest(route, "app", ManifestRef(digest=digest))
        assert again.offline and again.manifest.digest == digest
    finally:
        await restarted.close()


DEV_ALLOW_POLICY = """\
default: deny
scopes:
  - match: "r.test/app"
    require:
      referrers:
        - artifactType: application/spdx+json
          signedBy: {cosign: {key: keys/sbom.pub}}
  - match: "r.test/app"
    namespaces: [dev]
    mode: allow
"""


async def test_refuses_offline_fallback_to_a_pod_scopes_verdict_for_a_mirror_pull(
    tmp_path: Path, blobs: MemoryBlobStore
) -> None:
    """Allowed unverified for pods in dev only, the stored manifest is not served to a
    pull outside that scope (nor restored for it) while the upstream is down."""
    cs.generate_key().write_public(tmp_path / "keys" / "sbom.pub")
    policy = parse_policy(DEV_ALLOW_POLICY.encode(), base_dir=tmp_path, source="policy.yaml")
    upstream = Upstream()
    manifest = image(b"layer").raw
    digest = Digest.of(manifest)
    upstream.paths[f"/v2/app/manifests/{digest}"] = FakeUpstream(
        manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    route = Route(registry=REGISTRY, client=cast(Any, upstream), explicit_ns=True)
    manifests = MemoryVerifiedManifests()
    first = Pipeline(
        gate=SignatureGate(policy), store=blobs, manifests=manifests, metrics=Metrics()
    )
    try:
        served = await first.get_manifest(
            route, "app", ManifestRef(digest=digest), pod=Pod.of("dev", {})
        )
        assert served.verdict.allowed and served.verdict.mode == "allow"
    finally:
        await first.close()
    upstream.down = True
    restarted = Pipeline(
        gate=SignatureGate(policy), store=blobs, manifests=manifests, metrics=Metrics()
    )
    try:
        with pytest.raises(UpstreamUnavailable, match="another pull context"):
            await restarted.get_manifest(route, "app", ManifestRef(digest=digest))
        assert not restarted.manifest_path._allowances.allowed(route, "app", Digest.of(b"layer"))
    finally:
        await restarted.close()
