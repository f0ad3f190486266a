"""Index coverage across pull contexts: a child is covered only for a pull whose own
scope for the index is the one that verified it (real cosign signatures, real keys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest
from proxy.pipeline.allowed import Allowances
from proxy.pipeline.gate import Pod, RepoKey
from proxy.pipeline.shared import SharedAllowances
from proxy.verify.policy import Policy, parse_policy
from proxy.verify.signature_gate import COVERED, SignatureGate
from proxy.verify.verdicts import VerdictCache
from tests.support import cosign_sign as cs
from tests.unit.verify.manifests import image, index

REPO = RepoKey("registry.example.test", "team/app")
DEV, PROD = Pod("ml-dev"), Pod("prod")
POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/**"
    require: {cosign: {key: keys/release.pub}}
  - match: "registry.example.test/**"
    namespaces: [ml-dev]
    require: {cosign: {key: keys/dev.pub}}
"""


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, cs.TestKey]:
    made = {name: cs.generate_key() for name in ("release", "dev")}
    for name, key in made.items():
        key.write_public(tmp_path / "keys" / f"{name}.pub")
    return made


@pytest.fixture
def policy(tmp_path: Path, keys: dict[str, cs.TestKey]) -> Policy:
    return parse_policy(POLICY.encode(), base_dir=tmp_path, source="policy.yaml")


def registry_with(top: Manifest, *manifests: Manifest) -> cs.MemoryRegistry:
    registry = cs.MemoryRegistry()
    for manifest in (top, *manifests):
        registry.push_manifest(str(manifest.digest), manifest.raw, manifest.media_type)
    return registry


def sign(registry: cs.MemoryRegistry, digest: Digest, *keys: cs.TestKey) -> None:
    """cosign's signature image of ``digest``: one layer per key (replacing any)."""
    payload = cs.simple_signing_payload(digest, f"{REPO.registry}/{REPO.repository}")
    registry.add(cs.signature_image(digest, [cs.sign_layer(key, payload) for key in keys]))


async def test_refuses_child_covered_for_one_pod_to_every_other_pull(
    policy: Policy, keys: dict[str, cs.TestKey]
) -> None:
    child = image(b"platform child")
    top = index(child)
    registry = registry_with(top, child)
    sign(registry, top.digest, keys["dev"])
    gate = SignatureGate(policy)
    assert (await gate.check_manifest(REPO, top, registry, pod=DEV)).allowed
    assert gate.child_allowed(REPO, child.digest, DEV)
    assert not gate.child_allowed(REPO, child.digest)
    assert not gate.child_allowed(REPO, child.digest, PROD)
    for pod in (None, PROD):
        verdict = await gate.check_manifest(REPO, child, registry, pod=pod)
        assert not verdict.allowed
        assert "no cosign signature verified with key keys/release.pub" in verdict.reason
    verdict = await gate.check_manifest(REPO, child, registry, pod=DEV)
    assert verdict.allowed and verdict.scope == "(index)"


async def test_coverage_under_two_scopes_is_kept_for_each(
    policy: Policy, keys: dict[str, cs.TestKey]
) -> None:
    """Pulls for ml-dev and for everyone alternate: neither displaces the other's."""
    child = image(b"child of a twice-signed index")
    top = index(child)
    registry = registry_with(top, child)
    sign(registry, top.digest, keys["dev"], keys["release"])
    now = [0.0]
    gate = SignatureGate(policy, verdicts=VerdictCache(clock=lambda: now[0]))
    assert (await gate.check_manifest(REPO, top, registry, pod=DEV)).allowed
    assert not gate.child_allowed(REPO, child.digest)  # not verified for everyone yet
    for pod in (None, DEV, None):
        assert (await gate.check_manifest(REPO, top, registry, pod=pod)).allowed
        assert gate.child_allowed(REPO, child.digest, DEV)
        assert gate.child_allowed(REPO, child.digest)
    # A refusal of the index in any context closes its coverage in every one.
    registry.manifests.clear()
    now[0] += policy.positive_ttl + 1
    assert not (await gate.check_manifest(REPO, top, registry, pod=PROD)).allowed
    assert not gate.child_allowed(REPO, child.digest, DEV)
    assert not gate.child_allowed(REPO, child.digest)


async def test_refuses_grandchild_through_a_nested_index_covered_for_another_pod(
    policy: Policy, keys: dict[str, cs.TestKey]
) -> None:
    grandchild = image(b"grandchild")
    inner = index(grandchild)
    top = index(inner)
    registry = registry_with(top, inner, grandchild)
    sign(registry, top.digest, keys["dev"])
    gate = SignatureGate(policy)
    assert (await gate.check_manifest(REPO, top, registry, pod=DEV)).allowed
    assert (await gate.check_manifest(REPO, inner, registry, pod=DEV)).scope == "(index)"
    assert gate.child_allowed(REPO, grandchild.digest, DEV)
    assert not gate.child_allowed(REPO, grandchild.digest)
    assert not (await gate.check_manifest(REPO, grandchild, registry)).allowed


async def test_refuses_child_a_sibling_worker_covered_for_a_pod_to_the_mirror(
    policy: Policy, keys: dict[str, cs.TestKey], tmp_path: Path
) -> None:
    store = tmp_path / "allowances.db"
    SharedAllowances.create(store)
    first, second = (
        SignatureGate(policy, shared=SharedAllowances(store, covered_fingerprint=COVERED))
        for _ in range(2)
    )
    child = image(b"child shared between workers")
    top = index(child)
    registry = registry_with(top, child)
    sign(registry, top.digest, keys["dev"])
    assert (await first.check_manifest(REPO, top, registry, pod=DEV)).allowed
    assert not second.child_allowed(REPO, child.digest)
    assert not (await second.check_manifest(REPO, child, registry)).allowed
    # The pod's own pull is served by either worker.
    assert (await second.check_manifest(REPO, child, registry, pod=DEV)).allowed
    # The mirror's pull verifies the index under its own scope, and then has coverage
    # of its own in both workers, beside the pod's.
    sign(registry, top.digest, keys["dev"], keys["release"])
    assert (await second.check_manifest(REPO, top, registry)).allowed
    for gate in (first, second):
        assert gate.child_allowed(REPO, child.digest)
        assert gate.child_allowed(REPO, child.digest, DEV)


def test_allowances_keep_one_record_per_decider() -> None:
    allowances = Allowances()
    manifest, blob = Digest.of(b"manifest"), Digest.of(b"blob")
    allowances.record(REPO, manifest, [blob], fingerprint="pod scope")
    allowances.record(REPO, manifest, [blob], fingerprint="scope for everyone")
    assert allowances.holds(REPO, manifest, "pod scope")
    assert {h[2] for h in allowances.holders(REPO, blob)} == {"pod scope", "scope for everyone"}
    allowances.retain([(REPO, manifest, "scope for everyone")])
    assert [h[2] for h in allowances.holders(REPO, blob)] == ["scope for everyone"]
    assert (REPO, blob) in allowances
    assert allowances.revoke(REPO, manifest)
    assert (REPO, blob) not in allowances and allowances.holders(REPO, blob) == []
