"""cosign's new-bundle-format DSSE attestation as an OCI referrer (vectors README section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.verify.base import Limits, Subject, TrustConfig
from proxy.verify.cosign import cosign_verifier_from_spec
from tests.support.cosign_sign import MemoryRegistry

VECTORS = Path(__file__).resolve().parents[3] / ".." / "shared" / "vectors"
COSIGN = VECTORS / "cosign"
TESTDATA = COSIGN / "pkg" / "cosign" / "testdata"
DERIVED = COSIGN / "derived"
STORE = VECTORS / "sigstore-python" / "sigstore" / "_store"
PGI = TESTDATA / "trusted_root_pgi.json"
PRD = STORE / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json"
STG = STORE / "https%3A%2F%2Ftuf-repo-cdn.sigstage.dev" / "trusted_root.json"
IDENTITY = {"issuer": "https://github.com/login/oauth", "subject": "cody@soyland.com"}
PREDICATE = "https://cosign.sigstore.dev/attestation/v1"

pytestmark = pytest.mark.skipif(
    not COSIGN.is_dir(), reason=f"signature vectors not found at {COSIGN} (../shared/vectors)"
)


def _image() -> tuple[Subject, MemoryRegistry]:
    manifest = (DERIVED / "empty-image-manifest.json").read_bytes()
    registry = MemoryRegistry()
    registry.push_blob((DERIVED / "empty-image-config.json").read_bytes())
    registry.push_manifest("latest", manifest, mt.DOCKER_MANIFEST)
    registry.push_blob(b"{}")
    registry.push_blob((TESTDATA / "oci-attestation.sigstore.json").read_bytes())
    referrer = (DERIVED / "referrer-manifest.json").read_bytes()
    registry.push_manifest(str(Digest.of(referrer)), referrer, mt.OCI_MANIFEST)
    subject = Subject(
        "127.0.0.1:60943", "repo", Digest.of(manifest), mt.DOCKER_MANIFEST, len(manifest)
    )
    return subject, registry


async def _verify(root: Path, **spec: Any) -> tuple[bool, str]:
    verifier = cosign_verifier_from_spec(
        {"keyless": IDENTITY, "tlog": "required", **spec},
        base_dir=TESTDATA,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    subject, registry = _image()
    result = await verifier.verify(subject, registry, Limits())
    return result.ok, result.reason


def test_subject_digest_is_the_documented_image() -> None:
    subject, _ = _image()
    assert subject.digest.hex.startswith("732112270d7e")


@pytest.mark.parametrize("root", [PGI, PRD], ids=["pgi", "prd"])
async def test_cosign_attestation_with_required_predicate_type_verifies(root: Path) -> None:
    ok, reason = await _verify(root, predicateType=PREDICATE)
    assert ok, reason


@pytest.mark.parametrize("root", [PGI, PRD], ids=["pgi", "prd"])
async def test_refuses_real_cosign_attestation_as_signature(root: Path) -> None:
    """``cosign attest`` output (custom predicate) verifies in full, chain, log and
    identity, but a plain requirement takes only what ``cosign sign`` writes."""
    ok, reason = await _verify(root)
    assert not ok
    assert f"bundle is an attestation (predicate type {PREDICATE!r})" in reason


async def test_refuses_cosign_attestation_with_other_predicate_type() -> None:
    ok, reason = await _verify(PGI, predicateType="https://slsa.dev/provenance/v1")
    assert not ok
    assert "predicate type" in reason


async def test_refuses_cosign_attestation_against_staging_root() -> None:
    ok, reason = await _verify(STG)
    assert not ok
    assert "chain" in reason


async def test_refuses_cosign_attestation_for_other_identity() -> None:
    verifier = cosign_verifier_from_spec(
        {"keyless": {"issuer": IDENTITY["issuer"], "subject": "someone@else.test"}},
        base_dir=TESTDATA,
        trust=TrustConfig(sigstore_trusted_root=PGI),
    )
    subject, registry = _image()
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok
    assert "does not match someone@else.test" in result.reason


async def test_refuses_cosign_attestation_referrer_listed_under_other_image() -> None:
    """The registry lists the real referrer under another digest: referrer spoofing."""
    subject, registry = _image()
    index = await registry.referrers(subject.digest, mt.SIGSTORE_BUNDLE_V03)
    assert index is not None
    other = Subject(
        subject.registry, subject.repository, Digest.of(b"other image"), mt.DOCKER_MANIFEST, 11
    )
    registry.spoofed_referrers[other.digest] = list(index.manifests)
    verifier = cosign_verifier_from_spec(
        {"keyless": IDENTITY}, base_dir=TESTDATA, trust=TrustConfig(sigstore_trusted_root=PGI)
    )
    result = await verifier.verify(other, registry, Limits())
    assert not result.ok
    assert "about another manifest" in result.reason
