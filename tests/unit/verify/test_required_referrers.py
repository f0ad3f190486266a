# ruff: noqa: E501  (policy YAML is quoted on one line, as a user would write it)
"""Required referrers (an SBOM, an AIBOM) and cosign attestations by predicate type:
the policy form, its validation, and the gate's decisions over real cosign material."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.manifest import Descriptor, Manifest, parse_manifest
from proxy.pipeline.gate import RepoKey
from proxy.pipeline.shared import SharedAllowances
from proxy.verify.base import PolicyError
from proxy.verify.notation import JWS
from proxy.verify.policy import (
    AllOf,
    Policy,
    RequiredAttestation,
    RequiredReferrer,
    parse_policy,
)
from proxy.verify.signature_gate import COVERED, SignatureGate
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact

from . import test_vectors_cosign_bundle as vectors
from .manifests import index

SPDX = "application/spdx+json"
CYCLONEDX = "application/vnd.cyclonedx+json"
SPDX_PREDICATE = "https://spdx.dev/Document"
MODEL = "application/vnd.cncf.model.manifest.v1+json"
REPO = RepoKey("registry.example.test", "models/llm")

SBOM_POLICY = """\
default: deny
verdictCache: {positiveTTL: 300, negativeTTL: 300}
scopes:
  - match: "registry.example.test/models/**"
    require:
      referrers:
        - artifactType: application/spdx+json
          signedBy: {cosign: {key: keys/sbom.pub}}
"""

PLAIN_POLICY = SBOM_POLICY.replace(
    "      referrers:\n"
    "        - artifactType: application/spdx+json\n"
    "          signedBy: {cosign: {key: keys/sbom.pub}}\n",
    "      cosign: {key: keys/release.pub}\n",
)
SIGNED_AND_SBOM_POLICY = SBOM_POLICY.replace(
    "      referrers:\n"
    "        - artifactType: application/spdx+json\n"
    "          signedBy: {cosign: {key: keys/sbom.pub}}\n",
    "      allOf:\n"
    "        - cosign: {key: keys/release.pub}\n"
    "        - referrers:\n"
    "            - artifactType: application/spdx+json\n"
    "              signedBy: {cosign: {key: keys/sbom.pub}}\n",
)

ATTESTATION_POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/models/**"
    require:
      attestation:
        predicateType: https://spdx.dev/Document
        signedBy: {cosign: {key: keys/release.pub}}
"""


@pytest.fixture(scope="module")
def keys() -> dict[str, cs.TestKey]:
    return {"release": cs.generate_key(), "sbom": cs.generate_key(), "other": cs.generate_key()}


@pytest.fixture
def policy_dir(tmp_path: Path, keys: dict[str, cs.TestKey]) -> Path:
    keys["release"].write_public(tmp_path / "keys" / "release.pub")
    keys["sbom"].write_public(tmp_path / "keys" / "sbom.pub")
    return tmp_path


def parse(text: str, base_dir: Path) -> Policy:
    return parse_policy(text.encode(), base_dir=base_dir, source="policy.yaml")


def model(name: bytes = b"weights") -> cs.Artifact:
    """A small model artifact (empty config, one weight layer, artifactType set)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": MODEL,
        "config": {"mediaType": mt.OCI_EMPTY, "digest": str(Digest.of(b"{}")), "size": 2},
        "layers": [
            {
                "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                "digest": str(Digest.of(name)),
                "size": len(name),
                "annotations": {"org.opencontainers.image.title": "model.bin"},
            }
        ],
    }
    return cs.Artifact(json.dumps(doc).encode(), mt.OCI_MANIFEST, (b"{}", name))


def parsed(artifact: cs.Artifact) -> Manifest:
    return parse_manifest(artifact.manifest, artifact.media_type)


def sign(registry: cs.MemoryRegistry, key: cs.TestKey, digest: Digest) -> None:
    """A legacy cosign signature (tag ``sha256-<hex>.sig``) over ``digest``."""
    payload = cs.simple_signing_payload(digest, f"{REPO}")
    registry.add(cs.signature_image(digest, [cs.sign_layer(key, payload)]))


def with_sbom(
    subject: cs.Artifact, *, signed_with: cs.TestKey | None, artifact_type: str = SPDX
) -> tuple[cs.MemoryRegistry, cs.Artifact]:
    registry = cs.MemoryRegistry()
    registry.add(subject)
    sbom = cs.document_referrer(cs.spdx_document("llm"), subject.descriptor, artifact_type)
    registry.add(sbom)
    if signed_with is not None:
        sign(registry, signed_with, sbom.digest)
    return registry, sbom


async def decide(
    policy: Policy, subject: cs.Artifact, registry: cs.MemoryRegistry
) -> tuple[bool, str]:
    verdict = await SignatureGate(policy).check_manifest(REPO, parsed(subject), registry)
    return verdict.allowed, verdict.reason


# ---- the policy form -------------------------------------------------------------------


def test_reads_required_referrers_and_attestations(policy_dir: Path) -> None:
    policy = parse(
        """\
scopes:
  - match: "registry.example.test/models/**"
    require:
      allOf:
        - cosign: {key: keys/release.pub}
        - referrers:
            - artifactType: application/spdx+json
              signedBy: {anyOf: [{cosign: {key: keys/sbom.pub}}, {cosign: {key: keys/release.pub}}]}
            - artifactType: application/vnd.cyclonedx+json
              signedBy: {cosign: {key: keys/sbom.pub}}
        - attestation:
            predicateType: https://spdx.dev/Document
            signedBy: {cosign: {key: keys/release.pub}}
""",
        policy_dir,
    )
    require = policy.scopes[0].require
    assert isinstance(require, AllOf) and require.needs_referrers
    referrers, attestation = require.children[1], require.children[2]
    assert isinstance(referrers, AllOf)
    assert [r.artifact_type for r in referrers.children if isinstance(r, RequiredReferrer)] == [
        SPDX,
        CYCLONEDX,
    ]
    assert isinstance(attestation, RequiredAttestation)
    assert attestation.predicate_type == SPDX_PREDICATE
    assert "referrer application/spdx+json signed by anyOf[cosign key keys/sbom.pub" in (
        require.describe()
    )


def test_a_single_required_referrer_is_the_requirement_itself(policy_dir: Path) -> None:
    require = parse(SBOM_POLICY, policy_dir).scopes[0].require
    assert isinstance(require, RequiredReferrer)
    assert require.describe() == f"referrer {SPDX} signed by cosign key keys/sbom.pub"


def test_the_referrer_signers_key_is_trust_material(policy_dir: Path, tmp_path: Path) -> None:
    before = parse(SBOM_POLICY, policy_dir).revision
    cs.generate_key().write_public(policy_dir / "keys" / "sbom.pub")
    assert parse(SBOM_POLICY, policy_dir).revision != before


def test_the_readme_example_loads(policy_dir: Path) -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme[readme.index("**Required referrers**") :]
    start = section.index("```yaml") + len("```yaml")
    block = section[start : section.index("```", start)]
    cs.generate_key().write_public(policy_dir / "keys" / "model.pub")
    policy = parse("scopes:\n" + textwrap.dedent(block), policy_dir)
    require = policy.scopes[0].require
    assert isinstance(require, AllOf) and require.needs_referrers
    assert "referrer application/spdx+json signed by cosign key keys/sbom.pub" in (
        require.describe()
    )


REFERRER_SCOPE = "scopes:\n  - match: 'a/**'\n    require:\n      %s\n"


@pytest.mark.parametrize(
    ("require", "message"),
    [
        ("{referrers: []}", r"require\.referrers is empty: an empty list is a configuration"),
        (
            "{referrers: {artifactType: application/spdx+json}}",
            r"require\.referrers must be a list",
        ),
        (
            "{referrers: [{artifactType: application/spdx+json}]}",
            r"require\.referrers\[0\]\.signedBy is missing: an unsigned referrer proves nothing",
        ),
        (
            "{referrers: [{artifactType: application/spdx+json, signedBy: {anyOf: []}}]}",
            r"require\.referrers\[0\]\.signedBy\.anyOf is empty",
        ),
        (
            "{referrers: [{artifactType: spdx, signedBy: {cosign: {key: keys/sbom.pub}}}]}",
            r"require\.referrers\[0\]\.artifactType must be a media type like application/spdx",
        ),
        (
            "{referrers: [{signedBy: {cosign: {key: keys/sbom.pub}}}]}",
            r"require\.referrers\[0\]\.artifactType must be a media type",
        ),
        (
            "{referrers: [{artifactType: application/spdx+json, signed: {}, signedBy: {}}]}",
            r"require\.referrers\[0\]: unknown keys \['signed'\]",
        ),
        (
            "{referrers: [{artifactType: application/spdx+json, signedBy: {cosign: {key: nope.pub}}}]}",
            r"require\.referrers\[0\]\.signedBy\.cosign: .*nope\.pub",
        ),
        (
            "{referrers: [{artifactType: application/spdx+json, signedBy: {referrers: [{}]}}]}",
            r"require\.referrers\[0\]\.signedBy: referrers cannot be nested in signedBy",
        ),
        (
            "{referrers: [{artifactType: a/b, signedBy: {gpg: {key: k}}}]}",
            r"signedBy\.gpg: unknown requirement 'gpg'",
        ),
        ("{attestation: []}", r"require\.attestation must be a mapping"),
        (
            "{attestation: {signedBy: {cosign: {key: keys/release.pub}}}}",
            r"require\.attestation\.predicateType must be a URI",
        ),
        (
            "{attestation: {predicateType: https://spdx.dev/Document}}",
            r"require\.attestation\.signedBy is missing",
        ),
        (
            "{attestation: {predicateType: x, signedBy: {notation: {trustPolicy: p}}}}",
            r"attestation's signedBy takes cosign requirements only .* not 'notation'",
        ),
        (
            "{attestation: {predicateType: x, signedBy: {cosign: {key: keys/release.pub, predicateType: y}}}}",
            r"signedBy\.cosign\.predicateType differs from the attestation's predicateType",
        ),
        (
            "{attestation: {predicateType: x, signedBy: {attestation: {}}}}",
            r"attestation cannot be nested in signedBy",
        ),
    ],
)
def test_refuses_invalid_referrer_requirements_with_the_yaml_path(
    policy_dir: Path, require: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        parse(REFERRER_SCOPE % require, policy_dir)


@pytest.mark.parametrize(
    ("require", "message"),
    [
        (
            "{referrers: [{artifactType: a/b, signedBy: {anyOf: [{cosign: {key: keys/sbom.pub}}, "
            "{modelSigning: {key: keys/sbom.pub}}]}}]}",
            r"signedBy\.anyOf\[1\]: modelSigning cannot sign a required referrer",
        ),
        (
            "{referrers: [{artifactType: a/b, signedBy: {allOf: [{anyOf: [{referrers: []}]}]}}]}",
            r"signedBy\.allOf\[0\]\.anyOf\[0\]: referrers cannot be nested in signedBy",
        ),
        (
            "{attestation: {predicateType: x, signedBy: {anyOf: [{cosign: {key: keys/release.pub}}, "
            "{allOf: [{notation: {trustPolicy: p}}]}]}}}",
            r"signedBy\.anyOf\[1\]\.allOf\[0\]: an attestation's signedBy takes cosign",
        ),
    ],
)
def test_refuses_what_a_signed_by_forbids_at_any_depth_of_any_of_and_all_of(
    policy_dir: Path, require: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        parse(REFERRER_SCOPE % require, policy_dir)


def test_referrer_requirements_are_part_of_the_scopes_fingerprint(policy_dir: Path) -> None:
    plain = "scopes:\n  - match: 'registry.example.test/models/**'\n    require: {cosign: {key: keys/release.pub}}\n"
    required = (
        "scopes:\n  - match: 'registry.example.test/models/**'\n    require:\n      allOf:\n"
        "        - cosign: {key: keys/release.pub}\n"
        "        - referrers: [{artifactType: application/spdx+json, signedBy: {cosign: {key: keys/sbom.pub}}}]\n"
    )
    assert parse(plain, policy_dir).scopes[0].fingerprint != (
        parse(required, policy_dir).scopes[0].fingerprint
    )


# ---- gate decisions: SBOM referrers ------------------------------------------------------


async def test_refuses_model_without_the_required_sbom_naming_its_artifact_type(
    policy_dir: Path,
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"required referrer {SPDX} is missing" in reason


async def test_mode_warn_serves_a_model_without_its_sbom_and_says_what_is_missing(
    policy_dir: Path,
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    warn = SBOM_POLICY.replace("    require:\n", "    mode: warn\n    require:\n", 1)
    ok, reason = await decide(parse(warn, policy_dir), subject, registry)
    assert ok
    assert reason.startswith("would be refused (mode warn)")
    assert f"required referrer {SPDX} is missing" in reason


async def test_refuses_model_whose_sbom_is_unsigned(policy_dir: Path) -> None:
    subject = model()
    registry, _ = with_sbom(subject, signed_with=None)
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"required referrer {SPDX} is not signed as required (cosign key keys/sbom.pub)" in (
        reason
    )
    assert "no signatures found" in reason


async def test_refuses_model_whose_sbom_is_signed_with_another_key(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry, _ = with_sbom(subject, signed_with=keys["other"])
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"required referrer {SPDX} is not signed as required" in reason
    assert "does not verify" in reason


async def test_serves_model_whose_sbom_is_signed_with_the_required_key(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry, sbom = with_sbom(subject, signed_with=keys["sbom"])
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert ok, reason
    assert f"referrer {SPDX} {sbom.digest.hex[:16]}" in reason
    assert f"{sbom.digest.fallback_tag}.sig" in registry.fetched_manifests


async def test_serves_model_whose_sbom_is_signed_with_notation_as_required(
    tmp_path: Path,
) -> None:
    """signedBy takes any signature requirement: here a Notation trust policy."""
    notary = TestNotary()
    notary.write_trust(tmp_path / "notation")
    policy = parse(
        SBOM_POLICY.replace(
            "signedBy: {cosign: {key: keys/sbom.pub}}",
            "signedBy: {notation: {trustPolicy: notation/trustpolicy.json, "
            "trustStore: notation/truststore}}",
        ),
        tmp_path,
    )
    subject = model()
    registry, sbom = with_sbom(subject, signed_with=None)
    ok, reason = await decide(policy, subject, registry)
    assert not ok and "no Notation signatures found" in reason
    target = descriptor_of(sbom.manifest, sbom.media_type)
    registry.add(signature_artifact(notary.jws(target), JWS, target))
    ok, reason = await decide(policy, subject, registry)
    assert ok, reason


async def test_refuses_an_sbom_of_another_type_in_place_of_the_required_one(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry, _ = with_sbom(subject, signed_with=keys["sbom"], artifact_type=CYCLONEDX)
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"required referrer {SPDX} is missing" in reason


async def test_refuses_a_signed_sbom_about_another_model_listed_as_a_referrer(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """Referrer spoofing: the registry lists another model's signed SBOM under this one."""
    subject, other = model(b"this"), model(b"other")
    registry, sbom = with_sbom(other, signed_with=keys["sbom"])
    registry.add(subject)
    registry.spoofed_referrers[subject.digest] = [
        Descriptor(mt.OCI_MANIFEST, sbom.digest, len(sbom.manifest), artifact_type=SPDX)
    ]
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert "referrer is about another manifest (subject mismatch)" in reason


async def test_refuses_a_referrer_listed_with_the_required_type_that_has_another(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """The listing claims application/spdx+json; the signed manifest itself says otherwise."""
    subject = model()
    registry, sbom = with_sbom(subject, signed_with=keys["sbom"], artifact_type="text/plain")
    registry.spoofed_referrers[subject.digest] = [
        Descriptor(mt.OCI_MANIFEST, sbom.digest, len(sbom.manifest), artifact_type=SPDX)
    ]
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert "referrer's own artifactType is 'text/plain'" in reason


async def test_refuses_a_referrer_listed_larger_than_the_cap_without_fetching_it(
    policy_dir: Path,
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    huge = Descriptor(mt.OCI_MANIFEST, Digest.of(b"huge"), 1 << 30, artifact_type=SPDX)
    registry.spoofed_referrers[subject.digest] = [huge]
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"referrer manifest of {1 << 30} bytes exceeds the cap" in reason
    assert str(huge.digest) not in registry.fetched_manifests


async def test_every_listed_referrer_of_the_type_is_examined_up_to_the_limit(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry, _ = with_sbom(subject, signed_with=None)  # listed first
    signed = cs.document_referrer(cs.spdx_document("second"), subject.descriptor, SPDX)
    registry.add(signed)
    sign(registry, keys["sbom"], signed.digest)
    ok, reason = await decide(parse(SBOM_POLICY, policy_dir), subject, registry)
    assert ok, reason
    limited = parse(SBOM_POLICY.replace("default: deny", "limits: {maxSignatures: 1}"), policy_dir)
    ok, reason = await decide(limited, subject, registry)
    assert not ok
    assert "only the first 1 referrers were examined" in reason


async def test_an_unreachable_registry_while_listing_referrers_is_not_a_refusal(
    policy_dir: Path,
) -> None:
    class Down(cs.MemoryRegistry):
        async def referrers(self, digest: Digest, artifact_type: str | None = None) -> None:
            raise UpstreamUnavailable("registry down")

    subject = model()
    registry = Down()
    registry.add(subject)
    with pytest.raises(UpstreamUnavailable):
        await decide(parse(SBOM_POLICY, policy_dir), subject, registry)


# ---- gate decisions: attestations by predicate type ---------------------------------------


def attest(
    registry: cs.MemoryRegistry, subject: cs.Artifact, key: cs.TestKey, predicate: str
) -> None:
    statement = cs.in_toto_statement(subject.digest, predicate)
    bundle = cs.dsse_bundle(key, statement)
    registry.add(cs.bundle_referrer(bundle, subject.descriptor, predicate_type=predicate))


async def test_refuses_model_without_the_required_attestation_naming_its_predicate(
    policy_dir: Path,
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    ok, reason = await decide(parse(ATTESTATION_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"required attestation {SPDX_PREDICATE} is missing or not signed" in reason


async def test_refuses_a_plain_signature_where_an_attestation_is_required(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """A cosign signature by the right key carries no predicate: it is no attestation."""
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    sign(registry, keys["release"], subject.digest)
    bundle = cs.message_signature_bundle(keys["release"], subject.digest)
    registry.add(cs.bundle_referrer(bundle, subject.descriptor))
    ok, reason = await decide(parse(ATTESTATION_POLICY, policy_dir), subject, registry)
    assert not ok
    assert f"bundle is a plain signature, not an attestation of '{SPDX_PREDICATE}'" in reason
    assert f"{subject.digest.fallback_tag}.sig" not in registry.fetched_manifests


async def test_refuses_an_attestation_of_another_predicate_type(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    attest(registry, subject, keys["release"], "https://slsa.dev/provenance/v1")
    ok, reason = await decide(parse(ATTESTATION_POLICY, policy_dir), subject, registry)
    assert not ok
    assert "predicate type 'https://slsa.dev/provenance/v1' is not" in reason


async def test_refuses_an_attestation_signed_with_another_key(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    attest(registry, subject, keys["other"], SPDX_PREDICATE)
    ok, reason = await decide(parse(ATTESTATION_POLICY, policy_dir), subject, registry)
    assert not ok
    assert "DSSE signature does not verify" in reason


async def test_serves_model_with_the_required_attestation(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    attest(registry, subject, keys["release"], SPDX_PREDICATE)
    ok, reason = await decide(parse(ATTESTATION_POLICY, policy_dir), subject, registry)
    assert ok, reason
    assert f"attestation {SPDX_PREDICATE}" in reason


# ---- caching and coverage --------------------------------------------------------------


async def test_refuses_after_a_reload_adds_a_referrer_requirement_the_model_lacks(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """A verdict (and the allowances) decided without the requirement are not reused."""
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    sign(registry, keys["release"], subject.digest)
    gate = SignatureGate(parse(PLAIN_POLICY, policy_dir))
    manifest = parsed(subject)
    assert (await gate.check_manifest(REPO, manifest, registry)).allowed
    assert gate.blob_allowed(REPO, Digest.of(b"weights"))
    assert gate.replace_policy(parse(SIGNED_AND_SBOM_POLICY, policy_dir))
    assert not gate.blob_allowed(REPO, Digest.of(b"weights"))
    verdict = await gate.check_manifest(REPO, manifest, registry)
    assert not verdict.allowed
    assert f"required referrer {SPDX} is missing" in verdict.reason


async def test_refuses_index_child_whose_own_scope_requires_an_sbom(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """A verified index covers its children's digests, not their SBOMs."""
    policy = parse(
        SBOM_POLICY.replace(
            "    require:\n      referrers:",
            "    artifactTypes: ['application/vnd.cncf.model.manifest.v1+json']\n"
            "    require:\n      referrers:",
        )
        + "  - match: 'registry.example.test/models/**'\n"
        "    require: {cosign: {key: keys/release.pub}}\n",
        policy_dir,
    )
    child = model()
    top = index(parsed(child))
    registry = cs.MemoryRegistry()
    registry.add(child)
    registry.push_manifest(str(top.digest), top.raw, top.media_type)
    sign(registry, keys["release"], top.digest)
    gate = SignatureGate(policy)
    assert (await gate.check_manifest(REPO, top, registry)).allowed
    assert gate.child_allowed(REPO, child.digest)
    verdict = await gate.check_manifest(REPO, parsed(child), registry)
    assert not verdict.allowed
    assert f"required referrer {SPDX} is missing" in verdict.reason


async def test_refuses_where_a_sibling_worker_allowed_under_a_policy_without_the_requirement(
    policy_dir: Path, keys: dict[str, cs.TestKey], tmp_path: Path
) -> None:
    """Workers share decisions and blob grants; one made without the referrer
    requirement (a sibling still on the old policy) does not count here."""
    store = tmp_path / "allowances.db"
    SharedAllowances.create(store)
    subject = model()
    registry = cs.MemoryRegistry()
    registry.add(subject)
    sign(registry, keys["release"], subject.digest)
    old = SignatureGate(
        parse(PLAIN_POLICY, policy_dir),
        shared=SharedAllowances(store, covered_fingerprint=COVERED),
    )
    new = SignatureGate(
        parse(SIGNED_AND_SBOM_POLICY, policy_dir),
        shared=SharedAllowances(store, covered_fingerprint=COVERED),
    )
    assert (await old.check_manifest(REPO, parsed(subject), registry)).allowed
    assert not new.blob_allowed(REPO, Digest.of(b"weights"))
    verdict = await new.check_manifest(REPO, parsed(subject), registry)
    assert not verdict.allowed
    assert f"required referrer {SPDX} is missing" in verdict.reason


# ---- real cosign output ------------------------------------------------------------------


@pytest.mark.skipif(
    not vectors.COSIGN.is_dir(), reason=f"signature vectors not found at {vectors.COSIGN}"
)
@pytest.mark.parametrize(
    ("predicate", "allowed"),
    [(vectors.PREDICATE, True), ("https://slsa.dev/provenance/v1", False)],
)
async def test_a_real_cosign_attestation_satisfies_only_its_predicate_type(
    tmp_path: Path, predicate: str, allowed: bool
) -> None:
    """cosign's own new-bundle-format attestation referrer (vectors README section 5)."""
    policy = parse(
        f"trust: {{sigstoreTrustedRoot: {vectors.PGI}}}\n"
        "scopes:\n"
        "  - match: '**'\n"
        "    require:\n"
        "      attestation:\n"
        f"        predicateType: {predicate}\n"
        "        signedBy: {cosign: {keyless: {issuer: 'https://github.com/login/oauth', "
        "subject: cody@soyland.com}, tlog: required}}\n",
        tmp_path,
    )
    subject, registry = vectors._image()
    manifest = await registry.manifest("latest", max_bytes=1 << 20)
    assert manifest is not None
    verdict = await SignatureGate(policy).check_manifest(
        RepoKey(subject.registry, subject.repository), manifest, registry
    )
    assert verdict.allowed is allowed, verdict.reason
    if not allowed:
        assert f"required attestation {predicate} is missing or not signed" in verdict.reason


# ---- who may sign a referrer --------------------------------------------------------------


def test_refuses_model_signing_as_the_signer_of_a_required_referrer(policy_dir: Path) -> None:
    """An OMS signature binds files, not the referrer's manifest: the same signed SBOM
    file (with its model.sig) in a referrer naming any other model as subject verified,
    so one signed SBOM vouched for every model. Only a signature over the referrer's
    manifest digest binds its subject."""
    require = "{referrers: [{artifactType: application/spdx+json, signedBy: {anyOf: [{cosign: {key: keys/sbom.pub}}, {modelSigning: {key: keys/sbom.pub}}]}}]}"
    with pytest.raises(PolicyError, match=r"signedBy.*modelSigning.*subject"):
        parse(REFERRER_SCOPE % require, policy_dir)


# ---- index coverage across a reload ------------------------------------------------------

COVERED_CHILD_POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/models/**"
    artifactTypes: ['application/vnd.cncf.model.manifest.v1+json']
    require: %s
  - match: "registry.example.test/models/**"
    require: {cosign: {key: keys/release.pub}}
"""


async def test_refuses_blobs_of_a_covered_child_after_a_reload_requires_its_sbom(
    policy_dir: Path, keys: dict[str, cs.TestKey], tmp_path: Path
) -> None:
    """A child the index covered under the old policy keeps no blob allowance once its
    own scope requires an SBOM (the index's scope, unchanged, no longer decides it),
    in this worker and in a sibling reading the shared store."""
    before = parse(COVERED_CHILD_POLICY % "{cosign: {key: keys/release.pub}}", policy_dir)
    after = parse(
        COVERED_CHILD_POLICY
        % "{referrers: [{artifactType: application/spdx+json, signedBy: {cosign: {key: keys/release.pub}}}]}",
        policy_dir,
    )
    child = model()
    top = index(parsed(child))
    registry = cs.MemoryRegistry()
    registry.add(child)
    registry.push_manifest(str(top.digest), top.raw, top.media_type)
    sign(registry, keys["release"], top.digest)
    store = tmp_path / "allowances.db"
    SharedAllowances.create(store)
    gate = SignatureGate(before, shared=SharedAllowances(store, covered_fingerprint=COVERED))
    assert (await gate.check_manifest(REPO, top, registry)).allowed
    assert (await gate.check_manifest(REPO, parsed(child), registry)).allowed
    assert gate.blob_allowed(REPO, Digest.of(b"weights"))
    sibling = SignatureGate(after, shared=SharedAllowances(store, covered_fingerprint=COVERED))
    assert not sibling.blob_allowed(REPO, Digest.of(b"weights"))
    assert gate.replace_policy(after)
    assert gate.child_allowed(REPO, child.digest)  # the index's scope is unchanged
    assert not gate.blob_allowed(REPO, Digest.of(b"weights"))
    verdict = await gate.check_manifest(REPO, parsed(child), registry)
    assert not verdict.allowed and f"required referrer {SPDX} is missing" in verdict.reason


async def test_refuses_index_child_whose_own_scope_requires_a_cosign_predicate_type(
    policy_dir: Path, keys: dict[str, cs.TestKey]
) -> None:
    """``cosign: {..., predicateType}`` requires an attestation of the child itself,
    which the index's signature does not prove, like ``attestation:``."""
    policy = parse(
        COVERED_CHILD_POLICY
        % "{cosign: {key: keys/release.pub, predicateType: https://spdx.dev/Document}}",
        policy_dir,
    )
    child = model()
    top = index(parsed(child))
    registry = cs.MemoryRegistry()
    registry.add(child)
    registry.push_manifest(str(top.digest), top.raw, top.media_type)
    sign(registry, keys["release"], top.digest)
    gate = SignatureGate(policy)
    assert (await gate.check_manifest(REPO, top, registry)).allowed
    verdict = await gate.check_manifest(REPO, parsed(child), registry)
    assert not verdict.allowed and "no cosign signature verified" in verdict.reason
