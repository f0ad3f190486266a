# ruff: noqa: E501  (the issue's policy example is quoted verbatim)
"""Policy files (format, precedence, requirements, errors, revision and trust material)
and the gate's use of them: single-flight, revocation, reload retention, hot reload."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import ManifestTooLarge, TooManyRequests, UpstreamUnavailable
from proxy.oci.manifest import Manifest
from proxy.pipeline.gate import ArtifactSource, Pod, RepoKey
from proxy.verify import policy as policy_module
from proxy.verify.base import CheckResult, Limits, PolicyError, SignatureError, Subject
from proxy.verify.policy import (
    AllOf,
    AnyOf,
    Leaf,
    Mode,
    Policy,
    Scope,
    glob_to_regex,
    load_policy,
    parse_policy,
    policy_name,
)
from proxy.verify.reload import PolicyWatcher
from proxy.verify.signature_gate import SignatureGate
from proxy.verify.verdicts import VerdictCache
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary

from .manifests import image, index

ISSUE_EXAMPLE = """\
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
        - notation: {trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}
  - match: "registry.example.test/**"
    mode: enforce
    require:
      allOf:
        - cosign: {key: keys/release.pub}
"""

MODEL = "application/vnd.cncf.model.manifest.v1+json"
SUBJECT = Subject(
    registry="registry.example.test",
    repository="team/app",
    digest=Digest.of(b"manifest"),
    media_type="application/vnd.oci.image.manifest.v1+json",
    size=8,
)


@pytest.fixture(scope="module")
def trust_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trust material the issue's example names (generated once: keys are slow)."""
    root = tmp_path_factory.mktemp("trust-template")
    cs.generate_key().write_public(root / "keys" / "release.pub")
    cs.TestSigstore().write_trusted_root(root / "trust" / "trusted_root.json")
    TestNotary().write_trust(root / "notation")
    return root


@pytest.fixture
def policy_dir(tmp_path: Path, trust_template: Path) -> Path:
    shutil.copytree(trust_template, tmp_path, dirs_exist_ok=True)
    return tmp_path


def parse(text: str, base_dir: Path) -> Policy:
    return parse_policy(text.encode(), base_dir=base_dir, source="policy.yaml")


@dataclass
class FakeVerifier:
    label: str
    ok: bool = True
    error: BaseException | None = None
    delay: float = 0.0
    calls: list[Digest] = field(default_factory=list)

    def describe(self) -> str:
        return self.label

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        self.calls.append(subject.digest)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return CheckResult(self.ok, "verified" if self.ok else "payload digest does not match")


def scope(
    match: str,
    *,
    order: int = 0,
    types: frozenset[str] | None = None,
    namespaces: frozenset[str] | None = None,
    labels: tuple[tuple[str, str], ...] | None = None,
) -> Scope:
    return Scope(
        match=match,
        mode="allow",
        require=None,
        artifact_types=types,
        order=order,
        namespaces=namespaces,
        pod_labels=labels,
        _regex=glob_to_regex(match),
    )


def with_scopes(*scopes: Scope) -> Policy:
    return Policy(
        default="deny",
        scopes=scopes,
        limits=Limits(),
        positive_ttl=1,
        negative_ttl=1,
        revision="r",
        source="<test>",
    )


REPO = RepoKey("registry.example.test", "team/app")


# ---- the documented format -----------------------------------------------------------


def test_accepts_the_issue_example_verbatim_with_paths_relative_to_the_file(
    policy_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = policy_dir / "policy.yaml"
    path.write_text(ISSUE_EXAMPLE)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not relative to the cwd
    loaded = load_policy(path)
    assert loaded.default == "deny"
    models, everything = loaded.scopes
    assert models.match == "registry.example.test/models/**"
    assert models.artifact_types == frozenset({MODEL})
    assert models.mode == everything.mode == "enforce"
    assert isinstance(models.require, AnyOf)
    labels = [child.describe() for child in models.require.children]
    assert len(labels) == 3
    assert labels[0] == "cosign key keys/release.pub"
    assert "notation" in labels[2]
    assert isinstance(everything.require, AllOf)
    assert everything.require.describe() == "allOf[cosign key keys/release.pub]"
    assert loaded.limits == Limits()
    assert (loaded.positive_ttl, loaded.negative_ttl) == (300.0, 30.0)
    assert models.cover_children and everything.cover_children


def test_reads_limits_ttls_and_index_coverage(policy_dir: Path) -> None:
    loaded = parse(
        "limits: {maxSignatures: 5, maxSignatureManifestBytes: 4096, maxBundleBytes: 1000, deadlineSeconds: 2.5}\n"
        "verdictCache: {positiveTTL: 60, negativeTTL: 0}\n"
        "scopes:\n"
        "  - match: 'r.test/**'\n    indexes: eachChild\n"
        "    require: {cosign: {key: keys/release.pub}}\n",
        policy_dir,
    )
    assert loaded.limits == Limits(
        max_signatures=5,
        max_signature_manifest_bytes=4096,
        max_bundle_bytes=1000,
        deadline_seconds=2.5,
    )
    assert (loaded.positive_ttl, loaded.negative_ttl) == (60.0, 0.0)
    assert not loaded.scopes[0].cover_children
    assert isinstance(loaded.scopes[0].require, Leaf)


def test_requirements_nest_arbitrarily(policy_dir: Path) -> None:
    loaded = parse(
        "scopes:\n  - match: 'r.test/**'\n    require:\n"
        "      anyOf:\n"
        "        - allOf:\n"
        "            - cosign: {key: keys/release.pub}\n"
        "            - anyOf:\n"
        "                - notation: {trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}\n"
        "                - cosign: {key: keys/release.pub}\n"
        "        - cosign: {key: keys/release.pub}\n",
        policy_dir,
    )
    require = loaded.scopes[0].require
    assert isinstance(require, AnyOf)
    inner = require.children[0]
    assert isinstance(inner, AllOf) and isinstance(inner.children[1], AnyOf)


def test_revision_is_the_sha256_of_the_file_content(policy_dir: Path) -> None:
    text = "default: warn\n"
    assert parse(text, policy_dir).revision == hashlib.sha256(text.encode()).hexdigest()
    assert len(parse(text, policy_dir).revision) == 64
    assert parse("default: allow\n", policy_dir).revision != parse(text, policy_dir).revision


def test_revision_changes_when_a_named_key_is_rotated(policy_dir: Path) -> None:
    text = "scopes:\n  - match: 'r.test/**'\n    require: {cosign: {key: keys/release.pub}}\n"
    before = parse(text, policy_dir)
    assert policy_dir / "keys" / "release.pub" in before.material
    cs.generate_key().write_public(policy_dir / "keys" / "release.pub")
    after = parse(text, policy_dir)
    assert after.revision != before.revision
    assert after.trust_digest != before.trust_digest


def test_notation_trust_store_directory_is_trust_material(policy_dir: Path) -> None:
    text = (
        "scopes:\n  - match: 'r.test/**'\n    require: {notation: "
        "{trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}}\n"
    )
    before = parse(text, policy_dir)
    TestNotary().write_trust(policy_dir / "notation")  # a new CA in the same place
    assert parse(text, policy_dir).revision != before.revision
    extra = policy_dir / "notation" / "truststore" / "x509" / "ca" / "test" / "second.pem"
    extra.write_bytes(
        (policy_dir / "notation" / "truststore" / "x509" / "ca" / "test" / "root.pem").read_bytes()
    )
    assert extra in parse(text, policy_dir).material  # a file added to the store counts too


def test_trust_store_with_a_link_loop_is_walked_once(policy_dir: Path) -> None:
    (policy_dir / "notation" / "truststore" / "x509" / "loop").symlink_to("..")
    text = (
        "scopes:\n  - match: 'r.test/**'\n    require: {notation: "
        "{trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}}\n"
    )
    loaded = parse(text, policy_dir)
    names = [p.name for p in loaded.material]
    assert names.count("root.pem") == 1
    assert len(loaded.material) < 16


def test_strings_that_are_not_paths_are_not_trust_material(policy_dir: Path) -> None:
    (policy_dir / "https:").mkdir()  # a directory that an issuer URL would name
    loaded = parse(
        "trust: {sigstoreTrustedRoot: trust/trusted_root.json}\n"
        "scopes:\n  - match: 'r.test/**'\n    require: {cosign: {keyless: "
        "{issuer: 'https:', subject: 'regexp:^https://github.com/acme/'}}}\n",
        policy_dir,
    )
    assert loaded.material == (policy_dir / "trust" / "trusted_root.json",)


def test_refuses_trust_material_that_changes_while_the_policy_loads(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = policy_module._verifier

    def rotate_then_load(*args: object, **kwargs: object) -> object:
        # The key is rotated after it was hashed but before the verifier reads it.
        cs.generate_key().write_public(policy_dir / "keys" / "release.pub")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(policy_module, "_verifier", rotate_then_load)
    text = "scopes:\n  - match: 'r.test/**'\n    require: {cosign: {key: keys/release.pub}}\n"
    with pytest.raises(PolicyError, match="changed while the policy was loading"):
        parse(text, policy_dir)


# ---- errors name the YAML path ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "scopes:\n  - match: 'a/**'\n    require: {anyOf: []}\n",
            r"scopes\[0\]\.require\.anyOf is empty",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    require: {allOf: []}\n",
            r"scopes\[0\]\.require\.allOf is empty",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    require: {anyOf: [{cosign: {key: keys/release.pub}}, {allOf: []}]}\n",
            r"scopes\[0\]\.require\.anyOf\[1\]\.allOf is empty",
        ),
        ("scopes:\n  - match: 'a/**'\n    mode: maybe\n", r"scopes\[0\]\.mode must be one of"),
        ("default: perhaps\n", "default must be one of deny, warn, allow"),
        ("default: enforce\n", "default must be one of"),
        ("default: false\n", "default must be one of"),
        ("scopes:\n  - match: 'a/**'\n", r"scopes\[0\]\.require is missing"),
        ("scopes:\n  - match: ''\n    mode: allow\n", r"scopes\[0\]\.match"),
        ("scopes:\n  - mode: allow\n", r"scopes\[0\]\.match"),
        (
            "scopes:\n  - match: 'a/**'\n    require: {gpg: {key: k}}\n",
            r"scopes\[0\]\.require\.gpg: unknown requirement 'gpg'",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    require: {cosign: {key: keys/release.pub}, notation: {}}\n",
            "exactly one key",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    require: {cosign: {key: nope.pub}}\n",
            r"scopes\[0\]\.require\.cosign: .*nope\.pub",
        ),
        ("scopes:\n  - match: 'a/**'\n    require: {cosign: key}\n", "cosign must be a mapping"),
        ("scopes:\n  - match: 'a/**'\n    indexes: some\n    mode: allow\n", "indexes"),
        ("scopes:\n  - match: 'a/**'\n    artifactTypes: []\n    mode: allow\n", "artifactTypes"),
        ("scopes:\n  - match: 'a/**'\n    namespaces: []\n    mode: allow\n", "namespaces"),
        ("scopes:\n  - match: 'a/**'\n    namespaces: ml-dev\n    mode: allow\n", "namespaces"),
        (
            "scopes:\n  - match: 'a/**'\n    namespaces: [ML_Dev]\n    mode: allow\n",
            r"scopes\[0\]\.namespaces must be a non-empty list of namespace names",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    podLabels: {team: 1}\n    mode: allow\n",
            r"scopes\[0\]\.podLabels must be a non-empty mapping",
        ),
        ("scopes:\n  - match: 'a/**'\n    podLabels: {}\n    mode: allow\n", "podLabels"),
        ("scopes: {match: x}\n", "scopes must be a list"),
        ("bogus: 1\n", "unknown keys"),
        ("scopes:\n  - match: 'a/**'\n    mode: allow\n    requires: {}\n", "unknown keys"),
        ("scopes: [unclosed\n", "not valid YAML"),
        ("default: deny\ndefault: allow\n", "duplicate key 'default'"),
        (
            "scopes:\n  - match: 'a/**'\n    mode: enforce\n    mode: allow\n",
            "duplicate key 'mode'",
        ),
        (
            "scopes:\n  - match: 'a/**'\n    require: {modelSigning: {certificate: {caFile: x, 1: y}}}\n",
            "mapping keys must be strings",
        ),
        ("[a]: 1\n", "mapping keys must be strings"),
        ("", "empty"),
        ("- just a list\n", "must be a mapping"),
        ("limits: {maxSignatures: -1}\n", r"limits\.maxSignatures must be a positive integer"),
        ("limits: {maxSignatures: 1.5}\n", "positive integer"),
        ("limits: {deadlineSeconds: 0}\n", "deadlineSeconds must be positive"),
        ("limits: {bogus: 1}\n", "unknown keys"),
        ("verdictCache: {positiveTTL: -5}\n", r"verdictCache\.positiveTTL"),
        ("verdictCache: {negativeTTL: yes}\n", r"verdictCache\.negativeTTL"),
        ("trust: {sigstoreTrustedRoot: missing.json}\n", "sigstoreTrustedRoot: .* not found"),
    ],
)
def test_refuses_invalid_policy_with_the_yaml_path_of_the_problem(
    policy_dir: Path, text: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        parse(text, policy_dir)


def test_errors_name_the_policy_file(policy_dir: Path) -> None:
    path = policy_dir / "mine.yaml"
    path.write_text("scopes:\n  - match: 'a/**'\n    require: {anyOf: []}\n")
    with pytest.raises(PolicyError, match=r"mine\.yaml: scopes\[0\]"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(policy_dir / "absent.yaml")


# ---- scope matching and precedence -------------------------------------------------------


def test_most_specific_scope_wins_regardless_of_file_order() -> None:
    broad = scope("registry.example.test/**", order=0)
    segment = scope("registry.example.test/team/*", order=1)
    exact = scope("registry.example.test/team/app", order=2)
    assert with_scopes(exact, segment, broad).scope_for(REPO, None) is exact
    assert with_scopes(broad, segment).scope_for(REPO, None) is segment
    assert with_scopes(segment, broad).scope_for(REPO, None) is segment


def test_a_scope_for_the_pods_namespace_wins_only_for_pods_in_that_namespace() -> None:
    exact = scope("registry.example.test/team/app", order=0)
    dev = scope("registry.example.test/**", order=1, namespaces=frozenset({"ml-dev"}))
    policy = with_scopes(exact, dev)
    assert policy.pod_scoped
    # Named for the pod's namespace: it wins over a more specific scope that names none.
    assert policy.scope_for(REPO, None, Pod("ml-dev")) is dev
    # Another namespace, or no pod at all (a mirror request): it never applies.
    assert policy.scope_for(REPO, None, Pod("prod")) is exact
    assert policy.scope_for(REPO, None) is exact
    assert not with_scopes(exact).pod_scoped
    assert "for pods in namespaces ml-dev" in dev.label()


def test_a_scope_for_pod_labels_applies_only_to_pods_carrying_all_of_them() -> None:
    anyone = scope("registry.example.test/**", order=0)
    research = scope(
        "registry.example.test/**",
        order=1,
        labels=(("team", "research"), ("tier", "batch")),
    )
    policy = with_scopes(anyone, research)
    both = Pod.of("ml", {"team": "research", "tier": "batch", "app": "x"})
    assert policy.scope_for(REPO, None, both) is research
    assert policy.scope_for(REPO, None, Pod.of("ml", {"team": "research"})) is anyone
    assert policy.scope_for(REPO, None, Pod.of("ml", {"team": "other", "tier": "batch"})) is anyone
    assert policy.scope_for(REPO, None) is anyone
    assert "labels team=research,tier=batch" in research.label()


def test_policy_file_reads_namespaces_and_pod_labels(policy_dir: Path) -> None:
    loaded = parse(
        "scopes:\n  - match: 'registry.example.test/**'\n    namespaces: [ml-dev, ml-prod]\n"
        "    podLabels: {team: research}\n    mode: allow\n",
        policy_dir,
    )
    (only,) = loaded.scopes
    assert only.namespaces == frozenset({"ml-dev", "ml-prod"})
    assert only.pod_labels == (("team", "research"),)
    assert loaded.scope_for(REPO, None, Pod.of("ml-dev", {"team": "research"})) is only
    assert loaded.scope_for(REPO, None, Pod.of("ml-dev", {})) is None
    assert loaded.scope_for(REPO, None, Pod.of("default", {"team": "research"})) is None


def test_fewer_wildcards_break_a_tie_in_literal_characters() -> None:
    # Both have 26 literal characters; "team/a?p" has one wildcard, "team/a**p"... two.
    one = scope("registry.example.test/team/a?p", order=1)
    two = scope("registry.example.test/team/a**p", order=0)
    assert with_scopes(two, one).scope_for(REPO, None) is one


def test_file_order_breaks_a_full_tie() -> None:
    first = scope("registry.example.test/tea*/*", order=0)
    second = scope("registry.example.test/t*/ap*", order=1)
    assert first.specificity[:3] == second.specificity[:3]
    assert with_scopes(second, first).scope_for(REPO, None) is first


def test_single_star_stays_within_one_segment() -> None:
    one = scope("registry.example.test/*")
    assert with_scopes(one).scope_for(REPO, None) is None
    assert with_scopes(one).scope_for(RepoKey("registry.example.test", "app"), None) is one


def test_double_star_spans_segments_and_does_not_leak_to_other_registries() -> None:
    every = scope("registry.example.test/**")
    assert with_scopes(every).scope_for(RepoKey("registry.example.test", "a/b/c"), None) is every
    assert with_scopes(every).scope_for(RepoKey("registry.example.test.evil", "a"), None) is None
    assert (
        with_scopes(every).scope_for(RepoKey("other.test", "registry.example.test"), None) is None
    )


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("r.test/a?c", "r.test/abc", True),
        ("r.test/a?c", "r.test/a/c", False),  # ? stays within a segment
        ("r.test/a.c", "r.test/abc", False),  # . is a dot, not any character
        ("r.test/a+", "r.test/aa", False),
        ("r.test/(x|y)", "r.test/x", False),
        ("r.test/[ab]", "r.test/a", False),
        ("r.test/***", "r.test/a/b", True),  # ** then *
        ("r.test/**/c", "r.test/c", False),  # the slash before c is literal
    ],
)
def test_refuses_regex_metacharacters_in_a_glob_as_wildcards(
    pattern: str, name: str, matches: bool
) -> None:
    assert (glob_to_regex(pattern).fullmatch(name) is not None) is matches


def test_artifact_types_restrict_a_scope() -> None:
    models = scope("registry.example.test/**", order=0, types=frozenset({MODEL}))
    images = scope("registry.example.test/**", order=1)
    chosen = with_scopes(models, images)
    assert chosen.scope_for(REPO, MODEL) is models
    assert chosen.scope_for(REPO, None) is images
    assert chosen.scope_for(REPO, "application/vnd.oci.image.config.v1+json") is images
    assert with_scopes(models).scope_for(REPO, None) is None


def test_docker_hub_names_are_normalised_on_both_sides(policy_dir: Path) -> None:
    loaded = parse(
        "scopes:\n  - match: 'index.docker.io/library/**'\n    mode: allow\n"
        "  - match: 'Registry.Example.Test/team/*'\n    mode: allow\n",
        policy_dir,
    )
    hub, team = loaded.scopes
    assert hub.match == "docker.io/library/**"
    # "nginx" is what the upstream calls library/nginx: the library scope must apply.
    assert loaded.scope_for(RepoKey("docker.io", "nginx"), None) is hub
    assert policy_name("docker.io", "nginx") == "docker.io/library/nginx"
    assert team.match == "registry.example.test/team/*"
    assert loaded.scope_for(REPO, None) is team
    assert loaded.scope_for(RepoKey("registry-1.docker.io", "library/nginx"), None) is hub
    assert loaded.scope_for(RepoKey("Index.Docker.IO", "nginx"), None) is hub
    assert loaded.scope_for(RepoKey("docker.io", "bitnami/nginx"), None) is None


@pytest.mark.parametrize(
    ("pattern", "normalised"),
    [
        ("docker.io/nginx", "docker.io/library/nginx"),
        ("DOCKER.IO/ngin?", "docker.io/library/ngin?"),
        ("registry-1.docker.io/*", "docker.io/library/*"),
        ("docker.io/**", "docker.io/**"),
        ("docker.io/bitnami/*", "docker.io/bitnami/*"),
        ("Quay.IO/nginx", "quay.io/nginx"),
    ],
)
def test_docker_hub_patterns_are_normalised(pattern: str, normalised: str) -> None:
    assert policy_module.normalise_match(pattern) == normalised


# ---- requirement evaluation ------------------------------------------------------------


async def test_all_of_stops_at_the_first_failure_and_names_it() -> None:
    good, bad, never = (
        FakeVerifier("good"),
        FakeVerifier("cosign key k.pub", ok=False),
        FakeVerifier("never"),
    )
    result = await AllOf((Leaf(good), Leaf(bad), Leaf(never))).evaluate(
        SUBJECT, cs.MemoryRegistry(), Limits()
    )
    assert not result.ok
    assert result.reason == "allOf failed: cosign key k.pub: payload digest does not match"
    assert never.calls == []


async def test_any_of_first_pass_wins_and_failures_are_collected() -> None:
    bad, good, never = FakeVerifier("a", ok=False), FakeVerifier("b"), FakeVerifier("c")
    result = await AnyOf((Leaf(bad), Leaf(good), Leaf(never))).evaluate(
        SUBJECT, cs.MemoryRegistry(), Limits()
    )
    assert result.ok and never.calls == []
    both_bad = AnyOf(
        (Leaf(FakeVerifier("a", ok=False)), AllOf((Leaf(FakeVerifier("b", ok=False)),)))
    )
    result = await both_bad.evaluate(SUBJECT, cs.MemoryRegistry(), Limits())
    assert result.reason == (
        "anyOf failed: a: payload digest does not match | "
        "(allOf failed: b: payload digest does not match)"
    )


def test_refuses_empty_allof_at_construction() -> None:
    # Built in code rather than by the YAML loader, an empty allOf must still not pass.
    with pytest.raises(PolicyError, match="allOf needs at least one requirement"):
        AllOf(())


def test_refuses_empty_anyof_at_construction() -> None:
    with pytest.raises(PolicyError, match="anyOf needs at least one requirement"):
        AnyOf(())


def test_refuses_empty_combinator_nested_at_construction() -> None:
    with pytest.raises(PolicyError, match="allOf needs at least one requirement"):
        AnyOf((Leaf(FakeVerifier("a")), AllOf(())))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SignatureError("certificate expired"), "certificate expired"),
        (ManifestTooLarge("signature manifest too large"), "signature manifest too large"),
        (ValueError("bug"), "verifier error (ValueError)"),
    ],
)
async def test_a_raising_verifier_refuses_its_leaf(error: Exception, reason: str) -> None:
    result = await Leaf(FakeVerifier("v", error=error)).evaluate(
        SUBJECT, cs.MemoryRegistry(), Limits()
    )
    assert not result.ok and reason in result.reason


async def test_an_unreachable_registry_is_not_a_refusal() -> None:
    leaf = Leaf(FakeVerifier("v", error=UpstreamUnavailable("down")))
    with pytest.raises(UpstreamUnavailable):
        await leaf.evaluate(SUBJECT, cs.MemoryRegistry(), Limits())


async def test_a_verifier_that_raises_refuses_with_the_reason_at_the_gate() -> None:
    gate = SignatureGate(gate_policy(Leaf(FakeVerifier("v", error=ValueError("bug")))))
    verdict = await gate.check_manifest(REPO, image(), SOURCE)
    assert not verdict.allowed
    assert verdict.reason.startswith('scope "registry.example.test/**" (enforce): ')
    assert "verifier error (ValueError)" in verdict.reason


# ---- the gate: single-flight, transient errors, revocation -------------------------------

SOURCE = cs.MemoryRegistry()


def gate_policy(require: Leaf, *, revision: str = "r1", negative_ttl: float = 30) -> Policy:
    only = Scope(
        match="registry.example.test/**",
        mode="enforce",
        require=require,
        _regex=glob_to_regex("registry.example.test/**"),
    )
    return dataclasses.replace(
        with_scopes(only), revision=revision, positive_ttl=300, negative_ttl=negative_ttl
    )


def allowed(gate: SignatureGate, repo: RepoKey, manifest: Manifest) -> bool:
    return all(gate.blob_allowed(repo, d) for d in manifest.blob_digests)


async def test_concurrent_checks_of_one_digest_share_one_evaluation() -> None:
    verifier = FakeVerifier("v", delay=0.05)
    gate = SignatureGate(gate_policy(Leaf(verifier)))
    manifest = image()
    verdicts = await asyncio.gather(
        *(gate.check_manifest(REPO, manifest, SOURCE) for _ in range(20))
    )
    assert all(v.allowed for v in verdicts)
    assert len(verifier.calls) == 1
    other = image(b"another layer")  # another digest is another evaluation
    await asyncio.gather(*(gate.check_manifest(REPO, other, SOURCE) for _ in range(3)))
    assert len(verifier.calls) == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_evaluation() -> None:
    verifier = FakeVerifier("v", delay=0.05)
    gate = SignatureGate(gate_policy(Leaf(verifier)))
    manifest = image()
    first = asyncio.create_task(gate.check_manifest(REPO, manifest, SOURCE))
    second = asyncio.create_task(gate.check_manifest(REPO, manifest, SOURCE))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).allowed
    assert first.cancelled()
    assert len(verifier.calls) == 1


@pytest.mark.parametrize("error", [UpstreamUnavailable("down"), TooManyRequests("slow down")])
async def test_an_unreachable_registry_is_neither_a_refusal_nor_cached(error: Exception) -> None:
    verifier = FakeVerifier("v", error=error, delay=0.02)
    gate = SignatureGate(gate_policy(Leaf(verifier)))
    manifest = image()
    results = await asyncio.gather(
        *(gate.check_manifest(REPO, manifest, SOURCE) for _ in range(5)), return_exceptions=True
    )
    assert all(type(r) is type(error) for r in results)
    assert len(verifier.calls) == 1  # shared, too
    verifier.error = None
    assert (await gate.check_manifest(REPO, manifest, SOURCE)).allowed  # nothing was cached
    assert len(verifier.calls) == 2


async def test_refuses_blobs_of_a_manifest_that_stops_verifying() -> None:
    now = [0.0]
    verifier = FakeVerifier("v")
    gate = SignatureGate(gate_policy(Leaf(verifier)), verdicts=VerdictCache(clock=lambda: now[0]))
    manifest = image(b"signed, then not")
    assert (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert allowed(gate, REPO, manifest)
    verifier.ok = False  # the signature was withdrawn upstream
    now[0] = 301  # the allowing verdict expired
    assert not (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert not any(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)


async def test_refuses_children_of_an_index_that_stops_verifying() -> None:
    now = [0.0]
    verifier = FakeVerifier("v")
    gate = SignatureGate(gate_policy(Leaf(verifier)), verdicts=VerdictCache(clock=lambda: now[0]))
    child = image(b"child of a revoked index")
    grandchild = image(b"grandchild")
    inner = index(grandchild)
    parent = index(child, inner)
    assert (await gate.check_manifest(REPO, parent, SOURCE)).allowed
    verifier.ok = False  # children carry no signature of their own
    for manifest in (child, inner, grandchild):
        verdict = await gate.check_manifest(REPO, manifest, SOURCE)
        assert verdict.allowed and verdict.scope == "(index)"
    assert allowed(gate, REPO, child) and allowed(gate, REPO, grandchild)
    now[0] = 301
    assert not (await gate.check_manifest(REPO, parent, SOURCE)).allowed
    assert not gate.child_allowed(REPO, child.digest)
    assert not gate.child_allowed(REPO, grandchild.digest)  # transitively
    assert not any(gate.blob_allowed(REPO, d) for d in child.blob_digests)
    assert not any(gate.blob_allowed(REPO, d) for d in grandchild.blob_digests)
    assert not (await gate.check_manifest(REPO, child, SOURCE)).allowed


async def test_a_decision_under_a_replaced_policy_is_made_again() -> None:
    verifier = FakeVerifier("v", delay=0.05)
    gate = SignatureGate(gate_policy(Leaf(verifier)))
    manifest = image(b"verified under the old policy")
    pending = asyncio.create_task(gate.check_manifest(REPO, manifest, SOURCE))
    await asyncio.sleep(0.01)
    gate.replace_policy(dataclasses.replace(with_scopes(), revision="strict"))
    verdict = await pending
    assert not verdict.allowed and verdict.scope == "(default)"
    assert not any(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)


async def test_cache_hits_and_misses_are_counted() -> None:
    metrics = Metrics()
    gate = SignatureGate(gate_policy(Leaf(FakeVerifier("v"))), metrics=metrics)
    manifest = image()
    for _ in range(3):
        await gate.check_manifest(REPO, manifest, SOURCE)
    assert metrics.verdict_cache.labels("miss")._value.get() == 1
    assert metrics.verdict_cache.labels("hit")._value.get() == 2


# ---- reload: what allowances survive -----------------------------------------------------

TWO_SCOPES = """\
scopes:
  - match: "registry.example.test/team/**"
    require: {cosign: {key: keys/release.pub}}
  - match: "registry.example.test/other/**"
    require: {cosign: {key: keys/release.pub%s}}
"""
OTHER = RepoKey("registry.example.test", "other/app")


def with_fake(loaded: Policy, verifier: FakeVerifier) -> Policy:
    """``loaded`` with its leaves swapped for ``verifier`` (fingerprints kept)."""
    scopes = tuple(dataclasses.replace(s, require=Leaf(verifier)) for s in loaded.scopes)
    return dataclasses.replace(loaded, scopes=scopes)


async def test_reload_keeps_allowances_only_where_the_deciding_scope_is_unchanged(
    policy_dir: Path,
) -> None:
    verifier = FakeVerifier("v")
    gate = SignatureGate(with_fake(parse(TWO_SCOPES % "", policy_dir), verifier))
    team_child = image(b"team child")
    team, team_index, other = image(b"team"), index(team_child), image(b"other")
    await gate.check_manifest(REPO, team, SOURCE)
    await gate.check_manifest(REPO, team_index, SOURCE)
    await gate.check_manifest(REPO, team_child, SOURCE)
    await gate.check_manifest(OTHER, other, SOURCE)
    # Only the second scope changes (a reference rule its label does not show).
    assert gate.replace_policy(
        with_fake(parse(TWO_SCOPES % ", reference: repository", policy_dir), verifier)
    )
    assert allowed(gate, REPO, team) and allowed(gate, REPO, team_child)
    assert gate.child_allowed(REPO, team_child.digest)
    assert not any(gate.blob_allowed(OTHER, d) for d in other.blob_digests)


WEIGHTS_TAR_GZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
LAYER_SCOPES = """\
scopes:
%s  - match: "registry.example.test/team/**"
    require: {cosign: {key: keys/release.pub}}
"""
TAR_GZ_SCOPE = f"""\
  - match: "registry.example.test/team/**"
    layerMediaTypes: [{WEIGHTS_TAR_GZ}]
    require: {{modelSigning: {{key: keys/release.pub}}}}
"""


def test_a_scope_with_layer_media_types_applies_only_to_manifests_with_such_a_layer(
    policy_dir: Path,
) -> None:
    loaded = parse(LAYER_SCOPES % TAR_GZ_SCOPE, policy_dir)
    packed, anyone = loaded.scopes
    assert loaded.scope_for(REPO, image(b"w", layer_type=WEIGHTS_TAR_GZ).kind) is packed
    assert loaded.scope_for(REPO, image(b"w").kind) is anyone
    assert loaded.scope_for(REPO, None) is anyone  # no layers known: no layer scope


@pytest.mark.parametrize("value", ["application/x-tar", [], [3], {"a": "b"}])
def test_refuses_layer_media_types_that_are_not_a_list_of_media_types(
    policy_dir: Path, value: object
) -> None:
    text = f"scopes:\n  - match: '**'\n    layerMediaTypes: {value!r}\n    mode: allow\n"
    with pytest.raises(PolicyError, match="layerMediaTypes must be a non-empty list"):
        parse(text, policy_dir)


async def test_reload_drops_allowances_a_new_layer_media_type_scope_now_decides(
    policy_dir: Path,
) -> None:
    verifier = FakeVerifier("v")
    gate = SignatureGate(with_fake(parse(LAYER_SCOPES % "", policy_dir), verifier))
    packed, plain = image(b"packed", layer_type=WEIGHTS_TAR_GZ), image(b"plain")
    for manifest in (packed, plain):
        await gate.check_manifest(REPO, manifest, SOURCE)
    # A scope for tar+gzip weights comes first: it now decides the packed model only.
    assert gate.replace_policy(with_fake(parse(LAYER_SCOPES % TAR_GZ_SCOPE, policy_dir), verifier))
    # (Both share their config blob, which the plain image still allows.)
    assert not gate.blob_allowed(REPO, packed.layers[0].digest)
    assert allowed(gate, REPO, plain)


async def test_reload_refuses_every_allowance_when_a_trust_file_changes(policy_dir: Path) -> None:
    verifier = FakeVerifier("v")
    gate = SignatureGate(with_fake(parse(TWO_SCOPES % "", policy_dir), verifier))
    child = image(b"child")
    team, team_index = image(b"team"), index(child)
    for manifest in (team, team_index, child):
        await gate.check_manifest(REPO, manifest, SOURCE)
    cs.generate_key().write_public(policy_dir / "keys" / "release.pub")
    assert gate.replace_policy(with_fake(parse(TWO_SCOPES % "", policy_dir), verifier))
    assert not any(gate.blob_allowed(REPO, d) for d in team.blob_digests)
    assert not gate.child_allowed(REPO, child.digest)
    assert not any(gate.blob_allowed(REPO, d) for d in child.blob_digests)
    await gate.check_manifest(REPO, team, SOURCE)  # verified again under the new key
    assert allowed(gate, REPO, team) and len(verifier.calls) == 3


async def test_reload_refuses_allowances_of_scopes_not_read_from_a_file() -> None:
    gate = SignatureGate(gate_policy(Leaf(FakeVerifier("v"))))
    manifest = image()
    await gate.check_manifest(REPO, manifest, SOURCE)
    assert gate.replace_policy(gate_policy(Leaf(FakeVerifier("v")), revision="r2"))
    assert not any(gate.blob_allowed(REPO, d) for d in manifest.blob_digests)


# ---- hot reload of the policy and its trust files ----------------------------------------

KEYED = "scopes:\n  - match: 'r.test/**'\n    require: {cosign: {key: keys/%s}}\n"


def test_rotating_a_key_file_reloads_the_policy(policy_dir: Path) -> None:
    path = policy_dir / "policy.yaml"
    path.write_text(KEYED % "release.pub")
    metrics = Metrics()
    gate = SignatureGate(load_policy(path))
    watcher = PolicyWatcher(path=path, gate=gate, metrics=metrics)
    first = gate.revision
    assert not watcher.check_once()  # the same file and key: nothing new
    cs.generate_key().write_public(policy_dir / "keys" / "release.pub")
    assert watcher.check_once()
    assert gate.revision != first
    assert metrics.policy_reloads._value.get() == 1


def test_a_policy_refused_for_a_missing_key_loads_once_the_key_appears(policy_dir: Path) -> None:
    path = policy_dir / "policy.yaml"
    path.write_text("default: deny\n")
    metrics = Metrics()
    gate = SignatureGate(load_policy(path))
    watcher = PolicyWatcher(path=path, gate=gate, metrics=metrics)
    path.write_text(KEYED % "next.pub")  # the Secret with next.pub is not mounted yet
    assert not watcher.check_once()
    assert not watcher.check_once()
    assert metrics.policy_reload_failures._value.get() == 1  # counted once, not per poll
    assert gate.policy.default == "deny" and not gate.policy.scopes
    cs.generate_key().write_public(policy_dir / "keys" / "next.pub")
    assert watcher.check_once()
    assert gate.policy.scopes[0].match == "r.test/**"


async def test_a_namespace_warn_decision_is_that_pods_alone_and_never_serves_another() -> None:
    unsigned = FakeVerifier("cosign key k", ok=False)
    enforce = Scope(
        match="registry.example.test/**",
        mode="enforce",
        require=Leaf(unsigned),
        order=0,
        _regex=glob_to_regex("registry.example.test/**"),
    )
    dev = dataclasses.replace(enforce, mode="warn", order=1, namespaces=frozenset({"ml-dev"}))
    gate = SignatureGate(
        dataclasses.replace(with_scopes(enforce, dev), positive_ttl=300, negative_ttl=300)
    )
    assert gate.pod_scoped
    manifest = image(b"unsigned layer")
    for_dev = await gate.check_manifest(REPO, manifest, SOURCE, pod=Pod("ml-dev"))
    assert for_dev.allowed and for_dev.mode == "warn"
    # Cached for ml-dev, and still refused to anyone else: no pod, another namespace.
    assert not (await gate.check_manifest(REPO, manifest, SOURCE)).allowed
    assert not (await gate.check_manifest(REPO, manifest, SOURCE, pod=Pod("prod"))).allowed
    assert (await gate.check_manifest(REPO, manifest, SOURCE, pod=Pod("ml-dev"))).allowed
    # One evaluation per context (ml-dev; without a pod, shared by prod, whose scope is
    # the same): the cached decisions were served apart.
    assert len(unsigned.calls) == 2


async def test_each_verdict_says_what_decided_it() -> None:
    good, bad = FakeVerifier("cosign key good"), FakeVerifier("cosign key bad", ok=False)
    slow = FakeVerifier("cosign key slow", delay=5)

    def scoped(match: str, require: Leaf, mode: str = "enforce") -> Scope:
        return Scope(
            match=match,
            mode=cast(Mode, mode),
            require=require,
            _regex=glob_to_regex(match),
        )

    policy = dataclasses.replace(
        with_scopes(
            scoped("registry.example.test/ok/**", Leaf(good)),
            scoped("registry.example.test/bad/**", Leaf(bad)),
            scoped("registry.example.test/dev/**", Leaf(bad), mode="warn"),
            scoped("registry.example.test/slow/**", Leaf(slow)),
        ),
        limits=Limits(deadline_seconds=0.05),
    )
    gate = SignatureGate(policy)
    classes = {}
    for name in ("ok", "bad", "dev", "slow", "nowhere"):
        verdict = await gate.check_manifest(RepoKey(REPO.registry, f"{name}/app"), image(), SOURCE)
        classes[name] = (verdict.allowed, verdict.reason_class)
    assert classes == {
        "ok": (True, "verified"),
        "bad": (False, "refused"),
        "dev": (True, "warn"),
        "slow": (False, "deadline"),
        "nowhere": (False, "no_scope"),
    }
