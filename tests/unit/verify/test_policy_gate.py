# ruff: noqa: E501  (the documented policy example is quoted verbatim)
"""Policy parsing, scope precedence, modes, the gate's verdicts, allowances and reload."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.pipeline.gate import ArtifactSource, RepoKey
from proxy.verify.base import CheckResult, Limits, PolicyError, Subject
from proxy.verify.policy import AllOf, AnyOf, Leaf, Policy, Scope, glob_to_regex, parse_policy
from proxy.verify.reload import PolicyWatcher
from proxy.verify.signature_gate import SignatureGate
from proxy.verify.verdicts import VerdictCache
from tests.support import cosign_sign as cs

from .manifests import image, index

REPO = RepoKey("registry.example.test", "team/app")


@dataclass
class FakeVerifier:
    label: str
    ok: bool = True
    delay: float = 0.0
    calls: list[Digest] = field(default_factory=list)
    error: Exception | None = None

    def describe(self) -> str:
        return self.label

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        self.calls.append(subject.digest)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return CheckResult(self.ok, "signature verified" if self.ok else "payload digest mismatch")


def scope(
    match: str,
    require: object | None,
    *,
    mode: str = "enforce",
    order: int = 0,
    artifact_types: frozenset[str] | None = None,
    cover_children: bool = True,
) -> Scope:
    return Scope(
        match=match,
        mode=mode,  # type: ignore[arg-type]
        require=require,  # type: ignore[arg-type]
        artifact_types=artifact_types,
        cover_children=cover_children,
        order=order,
        _regex=glob_to_regex(match),
    )


def policy(*scopes: Scope, default: str = "deny", revision: str = "r1", **limits: float) -> Policy:
    return Policy(
        default=default,  # type: ignore[arg-type]
        scopes=scopes,
        limits=Limits(**limits),  # type: ignore[arg-type]
        positive_ttl=300,
        negative_ttl=30,
        revision=revision,
        source="<test>",
    )


SOURCE = cs.MemoryRegistry()


# ---- parsing -------------------------------------------------------------------------

ISSUE_EXAMPLE_COSIGN_ONLY = """\
default: deny
trust:
  sigstoreTrustedRoot: trust/trusted_root.json
scopes:
  - match: "registry.example.test/models/**"
    artifactTypes: ["application/vnd.cncf.model.manifest.v1+json"]
    mode: enforce
    require:
      anyOf:
        - cosign: {key: keys/release.pub}
        - cosign: {keyless: {issuer: "https://token.actions.githubusercontent.com", subject: "regexp:^https://github.com/acme/"}, tlog: required}
  - match: "registry.example.test/**"
    mode: enforce
    require:
      allOf:
        - cosign: {key: keys/release.pub}
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    cs.generate_key().write_public(tmp_path / "keys" / "release.pub")
    cs.TestSigstore().write_trusted_root(tmp_path / "trust" / "trusted_root.json")
    return tmp_path


def test_parses_the_documented_example_with_relative_paths(policy_dir: Path) -> None:
    loaded = parse_policy(ISSUE_EXAMPLE_COSIGN_ONLY.encode(), base_dir=policy_dir)
    assert loaded.default == "deny"
    assert [s.match for s in loaded.scopes] == [
        "registry.example.test/models/**",
        "registry.example.test/**",
    ]
    models = loaded.scopes[0]
    assert isinstance(models.require, AnyOf) and len(models.require.children) == 2
    assert isinstance(loaded.scopes[1].require, AllOf)
    assert "cosign key keys/release.pub" in loaded.scopes[1].require.describe()
    assert len(loaded.revision) == 64  # a full sha256 (logs print a prefix)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scopes:\n  - match: 'a/**'\n    require: {anyOf: []}\n", "empty"),
        ("scopes:\n  - match: 'a/**'\n    require: {allOf: []}\n", "empty"),
        ("scopes:\n  - match: 'a/**'\n    mode: maybe\n    require: {anyOf: []}\n", "mode"),
        ("default: perhaps\n", "default"),
        ("default: enforce\n", "default"),  # not a default: it would read as allow
        ("scopes:\n  - match: 'a/**'\n", "require is missing"),
        ("scopes:\n  - match: 'a/**'\n    require: {gpg: {key: k}}\n", "unknown requirement"),
        ("scopes:\n  - match: 'a/**'\n    require: {cosign: {key: nope.pub}}\n", "nope.pub"),
        ("bogus: 1\n", "unknown keys"),
        ("scopes: [unclosed\n", "YAML"),
        ("limits: {maxSignatures: -1}\n", "positive"),
        ("trust: {sigstoreTrustedRoot: missing.json}\n", "not found"),
    ],
)
def test_refuses_invalid_policy_with_clear_error(policy_dir: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text.encode(), base_dir=policy_dir)


def test_mode_allow_may_omit_requirements(policy_dir: Path) -> None:
    loaded = parse_policy(
        b"scopes:\n  - match: 'r.test/**'\n    mode: allow\n", base_dir=policy_dir
    )
    assert loaded.scopes[0].mode == "allow" and loaded.scopes[0].require is None


def test_limits_and_ttls_are_read(policy_dir: Path) -> None:
    loaded = parse_policy(
        b"limits: {maxSignatures: 5, maxBundleBytes: 1000, deadlineSeconds: 2.5}\n"
        b"verdictCache: {positiveTTL: 60, negativeTTL: 5}\n",
        base_dir=policy_dir,
    )
    assert loaded.limits.max_signatures == 5
    assert loaded.limits.max_bundle_bytes == 1000
    assert loaded.limits.deadline_seconds == 2.5
    assert (loaded.positive_ttl, loaded.negative_ttl) == (60, 5)


# ---- scope matching ------------------------------------------------------------------


def test_most_specific_scope_wins_regardless_of_order() -> None:
    broad = scope("registry.example.test/**", None, mode="allow", order=0)
    narrow = scope("registry.example.test/team/*", None, mode="allow", order=1)
    exact = scope("registry.example.test/team/app", None, mode="allow", order=2)
    chosen = policy(broad, narrow, exact).scope_for(REPO, None)
    assert chosen is exact
    assert policy(broad, narrow).scope_for(REPO, None) is narrow


def test_single_star_does_not_cross_segments() -> None:
    one = scope("registry.example.test/*", None, mode="allow")
    assert policy(one).scope_for(REPO, None) is None
    assert policy(one).scope_for(RepoKey("registry.example.test", "app"), None) is one


def test_artifact_types_restrict_a_scope() -> None:
    models = scope(
        "registry.example.test/**",
        None,
        mode="allow",
        artifact_types=frozenset({"application/vnd.cncf.model.manifest.v1+json"}),
    )
    chosen = policy(models)
    assert chosen.scope_for(REPO, None) is None
    assert chosen.scope_for(REPO, "application/vnd.cncf.model.manifest.v1+json") is models


# ---- gate verdicts -------------------------------------------------------------------


async def test_refuses_unmatched_reference_by_default() -> None:
    gate = SignatureGate(policy())
    verdict = await gate.check_manifest(REPO, image(), SOURCE)
    assert not verdict.allowed
    assert "no policy scope matches registry.example.test/team/app" in verdict.reason


async def test_default_allow_and_warn_serve_unmatched_references() -> None:
    for default in ("allow", "warn"):
        verdict = await SignatureGate(policy(default=default)).check_manifest(REPO, image(), SOURCE)
        assert verdict.allowed and verdict.mode == default


async def test_denial_names_scope_requirement_and_reason() -> None:
    failing = FakeVerifier("cosign key keys/release.pub", ok=False)
    gate = SignatureGate(policy(scope("registry.example.test/**", AllOf((Leaf(failing),)))))
    verdict = await gate.check_manifest(REPO, image(), SOURCE)
    assert not verdict.allowed
    assert verdict.reason.startswith('scope "registry.example.test/**" (enforce): allOf failed')
    assert "cosign key keys/release.pub: payload digest mismatch" in verdict.reason


async def test_any_of_passes_on_one_and_all_of_needs_all() -> None:
    good, bad = FakeVerifier("good"), FakeVerifier("bad", ok=False)
    any_gate = SignatureGate(policy(scope("**", AnyOf((Leaf(bad), Leaf(good))))))
    assert (await any_gate.check_manifest(REPO, image(), SOURCE)).allowed
    all_gate = SignatureGate(policy(scope("**", AllOf((Leaf(good), Leaf(bad))))))
    verdict = await all_gate.check_manifest(REPO, image(), SOURCE)
    assert not verdict.allowed and "bad: payload digest mismatch" in verdict.reason


async def test_warn_mode_serves_but_says_it_would_refuse() -> None:
    gate = SignatureGate(
        policy(scope("**", AllOf((Leaf(FakeVerifier("v", ok=False)),)), mode="warn"))
    )
    verdict = await gate.check_manifest(REPO, image(), SOURCE)
    assert verdict.allowed and verdict.mode == "warn"
    assert "would be refused" in verdict.reason


async def test_refuses_when_verification_deadline_is_exceeded() -> None:
    slow = FakeVerifier("slow", delay=5)
    gate = SignatureGate(policy(scope("**", Leaf(slow)), deadline_seconds=0.05))
    started = time.monotonic()
    verdict = await gate.check_manifest(REPO, image(), SOURCE)
    assert not verdict.allowed and "deadline" in verdict.reason
    assert time.monotonic() - started < 4  # bounded by the deadline, not the verifier


async def test_upstream_outage_during_verification_is_not_a_denial() -> None:
    down = FakeVerifier("v", error=UpstreamUnavailable("registry down"))
    gate = SignatureGate(policy(scope("**", Leaf(down))))
    with pytest.raises(UpstreamUnavailable):
        await gate.check_manifest(REPO, image(), SOURCE)


async def test_verdicts_are_cached_per_digest_and_policy_revision() -> None:
    verifier = FakeVerifier("v")
    gate = SignatureGate(policy(scope("**", Leaf(verifier))))
    manifest = image()
    for _ in range(3):
        assert (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert len(verifier.calls) == 1
    gate.replace_policy(policy(scope("**", Leaf(verifier)), revision="r2"))
    assert (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert len(verifier.calls) == 2


def test_verdict_cache_expires_entries() -> None:
    now = [0.0]
    cache = VerdictCache(clock=lambda: now[0])
    from proxy.pipeline.gate import Verdict

    cache.put(("r", "p", "d", "v"), Verdict(True, "ok"), ttl=10)
    assert cache.get(("r", "p", "d", "v")) is not None
    now[0] = 10.5
    assert cache.get(("r", "p", "d", "v")) is None


# ---- blob allowances -----------------------------------------------------------------


async def test_refuses_blob_not_referenced_by_a_verified_manifest() -> None:
    gate = SignatureGate(policy(scope("**", Leaf(FakeVerifier("v")))))
    manifest = image(b"verified layer")
    await gate.check_manifest(REPO, manifest, SOURCE)
    assert all(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)
    assert not gate.blob_allowed(REPO, Digest.of(b"some other layer"))


async def test_refuses_cross_repository_blob() -> None:
    gate = SignatureGate(policy(scope("**", Leaf(FakeVerifier("v")))))
    manifest = image(b"layer of app")
    await gate.check_manifest(REPO, manifest, SOURCE)
    other = RepoKey(REPO.registry, "team/other")
    assert not any(gate.blob_allowed(other, d) for d in manifest.blob_digests)


async def test_refuses_blobs_of_denied_manifest() -> None:
    gate = SignatureGate(policy(scope("**", Leaf(FakeVerifier("v", ok=False)))))
    manifest = image(b"unsigned layer")
    assert not (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert not any(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)


async def test_verified_index_covers_children_when_policy_says_so() -> None:
    verifier = FakeVerifier("v")
    child = image(b"child layer")
    parent = index(child)
    gate = SignatureGate(policy(scope("**", Leaf(verifier))))
    assert (await gate.check_manifest(REPO, parent, SOURCE)).allowed
    verifier.ok = False  # the child itself carries no signature
    verdict = await gate.check_manifest(REPO, child, SOURCE)
    assert verdict.allowed and "index" in verdict.reason


async def test_refuses_unsigned_child_when_each_child_must_verify() -> None:
    verifier = FakeVerifier("v")
    child = image(b"each child layer")
    gate = SignatureGate(policy(scope("**", Leaf(verifier), cover_children=False)))
    assert (await gate.check_manifest(REPO, index(child), SOURCE)).allowed
    verifier.ok = False
    assert not (await gate.check_manifest(REPO, child, SOURCE)).allowed


async def test_policy_change_revokes_allowances() -> None:
    gate = SignatureGate(policy(scope("**", Leaf(FakeVerifier("v")))))
    manifest = image(b"revoked layer")
    await gate.check_manifest(REPO, manifest, SOURCE)
    gate.replace_policy(policy(revision="strict"))
    assert not any(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)
    assert not (await gate.check_manifest(REPO, manifest, SOURCE)).allowed


# ---- hot reload ----------------------------------------------------------------------


def test_reload_swaps_policy_and_keeps_old_one_when_broken(policy_dir: Path) -> None:
    path = policy_dir / "policy.yaml"
    path.write_text("default: deny\n")
    from proxy.verify.policy import load_policy

    metrics = Metrics()
    gate = SignatureGate(load_policy(path))
    watcher = PolicyWatcher(path=path, gate=gate, metrics=metrics)
    first = gate.revision
    assert not watcher.check_once()  # unchanged

    path.write_text("default: allow\n")
    assert watcher.check_once()
    assert gate.policy.default == "allow" and gate.revision != first
    assert metrics.policy_reloads._value.get() == 1

    path.write_text("default: deny\nscopes: [unclosed\n")
    assert not watcher.check_once()
    assert gate.policy.default == "allow"
    assert metrics.policy_reload_failures._value.get() == 1


def test_reload_follows_a_configmap_symlink_swap(policy_dir: Path) -> None:
    from proxy.verify.policy import load_policy

    (policy_dir / "v1").mkdir()
    (policy_dir / "v2").mkdir()
    (policy_dir / "v1" / "policy.yaml").write_text("default: deny\n")
    (policy_dir / "v2" / "policy.yaml").write_text("default: warn\n")
    data = policy_dir / "..data"
    data.symlink_to(policy_dir / "v1")
    link = policy_dir / "policy.yaml"
    link.symlink_to(data / "policy.yaml")
    gate = SignatureGate(load_policy(link))
    watcher = PolicyWatcher(path=link, gate=gate, metrics=Metrics())
    swap = policy_dir / "..data_tmp"
    swap.symlink_to(policy_dir / "v2")
    swap.replace(data)  # atomic rename, as the kubelet does
    assert watcher.check_once()
    assert gate.policy.default == "warn"
