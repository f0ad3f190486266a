"""The gate's decisions as siblings share them: the encoding a worker stores for the
others, and refusals logged by one worker closing decisions cached in another, including
those made under a scope for some pods (real cosign signatures, real keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest
from proxy.pipeline.gate import Pod, RepoKey, Verdict
from proxy.pipeline.shared import SharedAllowances
from proxy.verify.policy import Policy, parse_policy
from proxy.verify.signature_gate import COVERED, Decision, SignatureGate
from tests.support import cosign_sign as cs
from tests.unit.verify.manifests import image

REPO = RepoKey("registry.example.test", "team/app")
DEV = Pod("ml-dev")
POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/**"
    require: {cosign: {key: keys/release.pub}}
  - match: "registry.example.test/**"
    namespaces: [ml-dev]
    require: {cosign: {key: keys/dev.pub}}
"""

ALLOWING = Decision(
    Verdict(
        allowed=True,
        reason='scope "registry.example.test/**" (enforce): signature verified',
        scope="registry.example.test/**",
        mode="enforce",
        details=("first", "second"),
        reason_class="verified",
    ),
    verified=True,
    cover_children=True,
    fingerprint="fingerprint of the deciding scope",
    decided_at=1_000_000.0,
)
WARNING = Decision(
    Verdict(allowed=True, reason="would be refused", scope="(default)", mode="warn"),
    fingerprint="default warn",
    would_refuse=True,
    decided_at=1_000_001.0,
)


@pytest.mark.parametrize("decision", [ALLOWING, WARNING], ids=["verified", "warn"])
def test_a_decision_reads_back_as_it_was_shared(decision: Decision) -> None:
    decoded = Decision.decode(
        decision.encode(), fingerprint=decision.fingerprint, decided_at=decision.decided_at
    )
    assert decoded == decision


def test_a_shared_decision_is_dated_and_attributed_by_its_grant() -> None:
    decoded = Decision.decode(ALLOWING.encode(), fingerprint="grant's", decided_at=5.0)
    assert decoded is not None
    assert (decoded.fingerprint, decoded.decided_at) == ("grant's", 5.0)


@pytest.mark.parametrize("flag", ["verdict.allowed", "verified", "cover_children", "would_refuse"])
@pytest.mark.parametrize("value", [1, "true", None, [True]])
def test_refuses_shared_decision_whose_flags_are_not_booleans(flag: str, value: object) -> None:
    doc = json.loads(ALLOWING.encode())
    *path, name = flag.split(".")
    target = doc[path[0]] if path else doc
    target[name] = value
    assert Decision.decode(json.dumps(doc), fingerprint="fp", decided_at=0.0) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{}",
        "[]",
        "null",
        '{"verdict": 5}',
        '{"verdict": {"allowed": true}}',
        json.dumps({**json.loads(ALLOWING.encode()), "unknown": 1}),
    ],
    ids=["empty", "text", "empty-object", "list", "null", "bad-verdict", "partial", "extra-key"],
)
def test_refuses_shared_decision_that_is_not_one(text: str) -> None:
    assert Decision.decode(text, fingerprint="fp", decided_at=0.0) is None


# ---- refusals in a sibling worker -----------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, cs.TestKey]:
    made = {name: cs.generate_key() for name in ("release", "dev")}
    for name, key in made.items():
        key.write_public(tmp_path / "keys" / f"{name}.pub")
    return made


@pytest.fixture
def policy(tmp_path: Path, keys: dict[str, cs.TestKey]) -> Policy:
    return parse_policy(POLICY.encode(), base_dir=tmp_path, source="policy.yaml")


def workers(tmp_path: Path, policy: Policy) -> tuple[SignatureGate, SignatureGate]:
    store = tmp_path / "allowances.db"
    SharedAllowances.create(store)
    first, second = (
        SignatureGate(policy, shared=SharedAllowances(store, covered_fingerprint=COVERED))
        for _ in range(2)
    )
    return first, second


def signed(manifest: Manifest, *keys: cs.TestKey) -> cs.MemoryRegistry:
    registry = cs.MemoryRegistry()
    registry.push_manifest(str(manifest.digest), manifest.raw, manifest.media_type)
    resign(registry, manifest.digest, *keys)
    return registry


def resign(registry: cs.MemoryRegistry, digest: Digest, *keys: cs.TestKey) -> None:
    """cosign's signature image of ``digest``: one layer per key (replacing any)."""
    payload = cs.simple_signing_payload(digest, f"{REPO.registry}/{REPO.repository}")
    registry.add(cs.signature_image(digest, [cs.sign_layer(key, payload) for key in keys]))


def serves_layers(gate: SignatureGate, manifest: Manifest) -> bool:
    return any(gate.blob_allowed(REPO, layer.digest) for layer in manifest.layers)


async def test_refuses_manifest_a_sibling_refused_for_a_pod_despite_a_cached_pod_verdict(
    tmp_path: Path, policy: Policy, keys: dict[str, cs.TestKey]
) -> None:
    """A verdict cached under a scope for some pods is closed by a sibling's refusal as
    one for everyone is: it is decided again, not replayed into new allowances."""
    manifest = image(b"refused by a sibling for a pod")
    registry = signed(manifest, keys["dev"])
    first, second = workers(tmp_path, policy)
    assert (await first.check_manifest(REPO, manifest, registry, pod=DEV)).allowed
    assert serves_layers(second, manifest)
    resign(registry, manifest.digest, keys["release"])  # no longer signed for ml-dev
    refused = await second.check_manifest(REPO, manifest, registry, pod=DEV)
    assert not refused.allowed and "keys/dev.pub" in refused.reason
    assert not serves_layers(first, manifest)
    again = await first.check_manifest(REPO, manifest, registry, pod=DEV)
    assert not again.allowed and "keys/dev.pub" in again.reason
    assert not serves_layers(first, manifest) and not serves_layers(second, manifest)
