"""Real sigstore-python bundles through ``verify_bundle`` (vectors README section 2).

These bundles sign files, not manifests: ``verify_bundle`` is given the artifact's
digest and bytes, exactly as the cosign verifier gives it a manifest digest.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.verify.base import PolicyError, SignatureError
from proxy.verify.bundle import CosignPolicy, sigstore_verifier_for, verify_bundle
from proxy.verify.sigstore_trust import KeylessIdentity, Matcher, load_trusted_root

VECTORS = Path(__file__).resolve().parents[3] / ".." / "shared" / "vectors"
SP = VECTORS / "sigstore-python"
ASSETS = SP / "test" / "assets"
STORE = SP / "sigstore" / "_store"
STG = STORE / "https%3A%2F%2Ftuf-repo-cdn.sigstage.dev" / "trusted_root.json"
PRD = STORE / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json"
GH = "https://github.com/login/oauth"
ACTIONS = "https://token.actions.githubusercontent.com"

pytestmark = pytest.mark.skipif(
    not SP.is_dir(), reason=f"signature vectors not found at {SP} (../shared/vectors)"
)

_POLICY_CACHE: dict[tuple[str, str, str], CosignPolicy] = {}


def _policy(root: Path, subject: str, issuer: str) -> CosignPolicy:
    cached = _POLICY_CACHE.get((str(root), subject, issuer))
    if cached is None:
        trust = load_trusted_root(root)
        cached = CosignPolicy(
            identity=KeylessIdentity(
                Matcher.parse(subject, where="subject"), Matcher.parse(issuer, where="issuer")
            ),
            trust=trust,
            tlog_required=True,
            sigstore_verifier=sigstore_verifier_for(trust),
        )
        _POLICY_CACHE[(str(root), subject, issuer)] = cached
    return cached


def _verify(bundle: str, artifact: str, root: Path, subject: str, issuer: str) -> str:
    data = (ASSETS / artifact).read_bytes()
    return verify_bundle(
        (ASSETS / bundle).read_bytes(),
        artifact_digest=Digest.of(data),
        artifact=data,
        policy=_policy(root, subject, issuer),
    )


def _root_with_tsa(tmp_path: Path) -> Path:
    """STG plus ``tsa/ca.json`` as a timestamp authority (README: to count the timestamps)."""
    doc = json.loads(STG.read_text())
    doc["timestampAuthorities"] = [json.loads((ASSETS / "tsa" / "ca.json").read_text())]
    path = tmp_path / "stg_with_tsa.json"
    path.write_text(json.dumps(doc))
    return path


# ---- Must VERIFY ----------------------------------------------------------------------

MUST_VERIFY = [
    ("bundle.txt.sigstore", "bundle.txt", STG, "a@tny.town", GH),
    ("bundle_v3.txt.sigstore", "bundle_v3.txt", STG, "william@yossarian.net", GH),
    (
        "integration/bundle_v3.txt.sigstore",
        "integration/bundle_v3.txt",
        STG,
        "william@yossarian.net",
        GH,
    ),
    ("bundle_v3_alt.txt.sigstore", "bundle_v3_alt.txt", STG, "william@yossarian.net", GH),
    ("staging-rekor-v2.txt.sigstore.json", "staging-rekor-v2.txt", STG, "jku@goto.fi", GH),
    (
        "bundle_v3_github.whl.sigstore",
        "bundle_v3_github.whl",
        PRD,
        "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2",
        ACTIONS,
    ),
]


@pytest.mark.parametrize(
    ("bundle", "artifact", "root", "subject", "issuer"),
    MUST_VERIFY,
    ids=[m[0] for m in MUST_VERIFY],
)
def test_sigstore_python_bundle_verifies(
    bundle: str, artifact: str, root: Path, subject: str, issuer: str
) -> None:
    assert _verify(bundle, artifact, root, subject, issuer)


def test_sigstore_python_bundle_verifies_by_digest_only() -> None:
    """What the cosign verifier does for an image: no artifact bytes, only the digest."""
    data = (ASSETS / "bundle_v3.txt").read_bytes()
    verify_bundle(
        (ASSETS / "bundle_v3.txt.sigstore").read_bytes(),
        artifact_digest=Digest.of(data),
        artifact=None,
        policy=_policy(STG, "william@yossarian.net", GH),
    )


def test_dsse_rekor_v2_bundle_verifies_against_statement_subject() -> None:
    raw = (ASSETS / "a.dsse.staging-rekor-v2.txt.sigstore.json").read_bytes()
    statement = json.loads(base64.b64decode(json.loads(raw)["dsseEnvelope"]["payload"]))
    digest = Digest.parse("sha256:" + statement["subject"][0]["digest"]["sha256"])
    identity = (
        "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/"
        ".github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main"
    )
    # An SLSA provenance attestation: it verifies where that predicate type is asked for,
    policy = replace(_policy(STG, identity, ACTIONS), predicate_type=statement["predicateType"])
    assert verify_bundle(raw, artifact_digest=digest, artifact=None, policy=policy)
    # ... never as a plain signature of its subject.
    with pytest.raises(SignatureError, match=r"bundle is an attestation .*slsa\.dev/provenance/v1"):
        verify_bundle(
            raw, artifact_digest=digest, artifact=None, policy=_policy(STG, identity, ACTIONS)
        )
    # The file itself is not the statement's subject (GHSA-w6c6-c85g-mmv6).
    other = Digest.of((ASSETS / "a.dsse.staging-rekor-v2.txt").read_bytes())
    with pytest.raises(SignatureError, match="not about"):
        verify_bundle(raw, artifact_digest=other, artifact=None, policy=policy)


def test_tsa_bundle_verifies_with_test_tsa(tmp_path: Path) -> None:
    root = _root_with_tsa(tmp_path)
    assert _verify(
        "tsa/bundle.txt.sigstore",
        "tsa/bundle.txt",
        root,
        "alexis.challande@trailofbits.com",
        "https://accounts.google.com",
    )


# ---- Must FAIL ------------------------------------------------------------------------

MUST_FAIL = [
    (
        "bundle_invalid_version.txt.sigstore",
        "bundle_invalid_version.txt",
        STG,
        "william@yossarian.net",
        "unsupported bundle mediaType",
    ),
    (
        "bundle_no_cert_v1.txt.sigstore",
        "bundle_no_cert_v1.txt",
        STG,
        "william@yossarian.net",
        "certificate",
    ),
    (
        "bundle_no_log_entry.txt.sigstore",
        "bundle_no_log_entry.txt",
        STG,
        "william@yossarian.net",
        "log entry",
    ),
    (
        "bundle_no_checkpoint.txt.sigstore",
        "bundle_no_checkpoint.txt",
        STG,
        "william@yossarian.net",
        "checkpoint",
    ),
    (
        "bundle_v3_no_signed_time.txt.sigstore.json",
        "bundle_v3_no_signed_time.txt",
        PRD,
        "regexp:.",
        "inclusion promise or signed timestamp",
    ),
    (
        "bundle_cve_2022_36056.txt.sigstore",
        "bundle_cve_2022_36056.txt",
        STG,
        "regexp:.",
        "inconsistent",
    ),
    # Mismatched artifacts.
    ("bundle.txt.sigstore", "bad.txt", STG, "a@tny.town", "digest mismatch"),
    (
        "bundle_v3.txt.sigstore",
        "bundle_v3_alt.txt",
        STG,
        "william@yossarian.net",
        "digest mismatch",
    ),
    # SAN mismatch.
    ("bundle.txt.sigstore", "bundle.txt", STG, "bad@ident.example.com", "does not match"),
    # Wrong roots.
    ("bundle_v3.txt.sigstore", "bundle_v3.txt", PRD, "william@yossarian.net", "chain"),
    ("bundle_v3_github.whl.sigstore", "bundle_v3_github.whl", STG, "regexp:.", "chain"),
]


@pytest.mark.parametrize(
    ("bundle", "artifact", "root", "subject", "why"),
    MUST_FAIL,
    ids=[f"{m[0]}-{m[1]}-{m[3][:10]}-{m[2].parent.name[-14:]}" for m in MUST_FAIL],
)
def test_refuses_sigstore_python_bundle(
    bundle: str, artifact: str, root: Path, subject: str, why: str
) -> None:
    with pytest.raises(SignatureError, match=why):
        _verify(bundle, artifact, root, subject, "regexp:.")


def test_refuses_python_release_bundle_without_checkpoint() -> None:
    raw = (ASSETS / "integration" / "Python-3.12.5.tgz.sigstore").read_bytes()
    digest = Digest.parse(
        "sha256:"
        + base64.b64decode(json.loads(raw)["messageSignature"]["messageDigest"]["digest"]).hex()
    )
    policy = _policy(PRD, "thomas@python.org", "https://accounts.google.com")
    with pytest.raises(SignatureError, match="checkpoint"):
        verify_bundle(raw, artifact_digest=digest, artifact=None, policy=policy)


@pytest.mark.parametrize(
    ("bundle", "why"),
    [
        ("tsa/bundle.duplicate.sigstore", "duplicate timestamp"),
        ("tsa/bundle.many_timestamp.sigstore", "too many signed timestamp"),
        ("tsa/bundle.txt.late_timestamp.sigstore", "chain"),
    ],
)
def test_refuses_bad_tsa_bundles(tmp_path: Path, bundle: str, why: str) -> None:
    root = _root_with_tsa(tmp_path)
    with pytest.raises(SignatureError, match=why):
        _verify(
            bundle,
            "tsa/bundle.txt",
            root,
            "alexis.challande@trailofbits.com",
            "https://accounts.google.com",
        )


def test_refuses_bundle_for_other_issuer() -> None:
    policy = _policy(STG, "william@yossarian.net", "https://accounts.google.com")
    data = (ASSETS / "bundle_v3.txt").read_bytes()
    with pytest.raises(SignatureError, match="issuer"):
        verify_bundle(
            (ASSETS / "bundle_v3.txt.sigstore").read_bytes(),
            artifact_digest=Digest.of(data),
            artifact=data,
            policy=policy,
        )


@pytest.mark.parametrize(
    "bad_root", ["trustedroot.badtype.json", "certificate_authority.empty.json"]
)
def test_refuses_bad_trusted_root_files(bad_root: str) -> None:
    with pytest.raises(PolicyError):
        trust = load_trusted_root(ASSETS / "trusted_root" / bad_root)
        sigstore_verifier_for(trust)
