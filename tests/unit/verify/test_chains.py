"""Certificate paths: ``proxy.verify.chains`` and the chain refusals of every verifier.

The class of cosign CVE-2022-36056 and Notation CVE-2023-33958: a leaf certificate issued
by a trusted CA must not act as an intermediate. Every certificate here is generated
with ``cryptography``; every refusal is asserted by its reason.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.verify.base import CheckResult, Limits, SignatureError, Subject, TrustConfig
from proxy.verify.chains import NOTATION, OMS, SIGSTORE, ChainError, verify_chain
from proxy.verify.cosign import cosign_verifier_from_spec
from proxy.verify.notation import COSE, JWS, notation_verifier_from_spec
from proxy.verify.oms import verify_with_ca
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact
from tests.support.pki_sign import CODE_SIGNING, Issued, issue, new_key, oms_certificate_bundle
from tests.support.pki_sign import reissue as reissue_certificate
from tests.unit.verify.test_oms import oms_statement

UTC = dt.UTC
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
STATEMENT = oms_statement({"model.safetensors": b"weights"})
NOT_A_CA = "basicConstraints"  # cryptography: "...CA certificate has no basicConstraints"
# or "basicConstraints.cA must be asserted in a CA certificate"


def _pki(*, root_path_length: int | None = None) -> tuple[Issued, Issued, Issued]:
    long_ago, years = dt.datetime.now(UTC) - dt.timedelta(days=60), dt.timedelta(days=3650)
    root = issue(
        "root",
        ca=True,
        path_length=root_path_length,
        key_usage="ca",
        not_before=long_ago,
        lifetime=years,
    )
    intermediate = issue(
        "intermediate", issuer=root, ca=True, key_usage="ca", not_before=long_ago, lifetime=years
    )
    leaf = issue("signer", issuer=intermediate, ca=False, key_usage="sign", eku=[CODE_SIGNING])
    return root, intermediate, leaf


def _oms_refusal(bundle: bytes, root: Issued) -> str:
    with pytest.raises(SignatureError) as info:
        verify_with_ca(bundle, [root.cert])
    return str(info.value)


# ---- the helper -----------------------------------------------------------------------


def test_verify_chain_returns_the_path_leaf_first() -> None:
    root, intermediate, leaf = _pki()
    now = dt.datetime.now(UTC)
    path = verify_chain(
        leaf.cert, [intermediate.cert], anchors=[root.cert], at=now, profile=NOTATION
    )
    assert path == [leaf.cert, intermediate.cert, root.cert]


def test_self_signed_signing_certificate_may_be_its_own_anchor() -> None:
    # Notation's "chain of one root that meets the leaf requirements" (the alpine vector).
    alone = issue("alone", key_usage="sign", eku=[CODE_SIGNING])
    now = dt.datetime.now(UTC)
    assert verify_chain(alone.cert, [], anchors=[alone.cert], at=now, profile=NOTATION) == [
        alone.cert
    ]


@pytest.mark.parametrize("profile", [NOTATION, OMS, SIGSTORE], ids=lambda p: p.name)
def test_refuses_leaf_used_as_intermediate_in_every_profile(profile: object) -> None:
    root, intermediate, leaf = _pki()
    forged = issue("forged", issuer=leaf, key_usage="sign", eku=[CODE_SIGNING])
    with pytest.raises(ChainError, match=NOT_A_CA):
        verify_chain(
            forged.cert,
            [leaf.cert, intermediate.cert],
            anchors=[root.cert],
            at=dt.datetime.now(UTC),
            profile=profile,  # type: ignore[arg-type]
        )


def test_refuses_certificate_expired_at_signing_time_and_names_it() -> None:
    root, intermediate, _ = _pki()
    start = dt.datetime.now(UTC) - dt.timedelta(days=3)
    leaf = issue(
        "short-lived",
        issuer=intermediate,
        key_usage="sign",
        eku=[CODE_SIGNING],
        not_before=start,
        lifetime=dt.timedelta(days=1),
    )
    during = start + dt.timedelta(hours=12)
    verify_chain(leaf.cert, [intermediate.cert], anchors=[root.cert], at=during, profile=OMS)
    after = start + dt.timedelta(days=1, seconds=1)
    with pytest.raises(ChainError, match="not valid at validation time") as info:
        verify_chain(leaf.cert, [intermediate.cert], anchors=[root.cert], at=after, profile=OMS)
    assert info.value.outside_validity == leaf.cert


def test_refuses_chain_longer_than_the_bound() -> None:
    root, intermediate, leaf = _pki()
    with pytest.raises(ChainError, match="longer than"):
        verify_chain(
            leaf.cert,
            [intermediate.cert] * 10,
            anchors=[root.cert],
            at=dt.datetime.now(UTC),
            profile=OMS,
        )


# ---- OMS (model signing with certificates) --------------------------------------------


def test_generated_oms_certificate_bundle_verifies() -> None:
    root, intermediate, leaf = _pki()
    bundle = oms_certificate_bundle(leaf, [leaf.cert, intermediate.cert], STATEMENT)
    assert verify_with_ca(bundle, [root.cert]) == STATEMENT


@pytest.mark.parametrize("leaf_constraints", [False, None], ids=["cA-false", "no-bc"])
def test_refuses_leaf_used_as_intermediate_for_oms_model(leaf_constraints: bool | None) -> None:
    root, intermediate, _ = _pki()
    leaf = issue(
        "signer", issuer=intermediate, ca=leaf_constraints, key_usage="sign", eku=[CODE_SIGNING]
    )
    forged = issue("forged", issuer=leaf, key_usage="sign", eku=[CODE_SIGNING])
    bundle = oms_certificate_bundle(forged, [forged.cert, leaf.cert, intermediate.cert], STATEMENT)
    reason = _oms_refusal(bundle, root)
    assert "does not chain to the configured CA" in reason
    assert NOT_A_CA in reason


def test_refuses_oms_chain_through_ca_without_code_signing_eku() -> None:
    root, _, _ = _pki()
    tls_ca = issue("tls ca", issuer=root, ca=True, key_usage="ca", eku=[SERVER_AUTH])
    leaf = issue("signer", issuer=tls_ca, key_usage="sign", eku=[CODE_SIGNING])
    bundle = oms_certificate_bundle(leaf, [leaf.cert, tls_ca.cert], STATEMENT)
    assert "extended key usage does not include code signing" in _oms_refusal(bundle, root)


def test_refuses_oms_certificate_expired_at_signing_time() -> None:
    # A bundle carries no trusted time: the signing time checked is now.
    root, intermediate, _ = _pki()
    leaf = issue(
        "expired",
        issuer=intermediate,
        key_usage="sign",
        eku=[CODE_SIGNING],
        not_before=dt.datetime.now(UTC) - dt.timedelta(days=10),
        lifetime=dt.timedelta(days=1),
    )
    bundle = oms_certificate_bundle(leaf, [leaf.cert, intermediate.cert], STATEMENT)
    assert "not valid at validation time" in _oms_refusal(bundle, root)


def test_refuses_oms_path_length_violation() -> None:
    root, intermediate, leaf = _pki(root_path_length=0)
    bundle = oms_certificate_bundle(leaf, [leaf.cert, intermediate.cert], STATEMENT)
    assert "path length constraint violated" in _oms_refusal(bundle, root)


def test_refuses_oms_signing_certificate_for_tls_only() -> None:
    root, intermediate, _ = _pki()
    leaf = issue("tls", issuer=intermediate, key_usage="sign", eku=[SERVER_AUTH])
    bundle = oms_certificate_bundle(leaf, [leaf.cert, intermediate.cert], STATEMENT)
    assert "not for code signing" in _oms_refusal(bundle, root)


# ---- Notation -------------------------------------------------------------------------


async def _notation_check(
    tmp_path: Path, trusted: TestNotary, signer: TestNotary, media_type: str = JWS, **kw: str
) -> CheckResult:
    """Sign a fresh image with ``signer``; verify it under ``trusted``'s root with
    ``signer``'s identity as the trusted identity."""
    registry = cs.MemoryRegistry()
    image = cs.image_manifest([b"chain test layer"])
    registry.add(image)
    target = descriptor_of(image.manifest, image.media_type)
    envelope = signer.jws(target) if media_type == JWS else signer.cose(target)
    registry.add(signature_artifact(envelope, media_type, target))
    policy_writer = copy.copy(trusted)
    policy_writer.identity = signer.identity
    policy_writer.write_trust(tmp_path, **kw)
    verifier = notation_verifier_from_spec(
        {"trustPolicy": "trustpolicy.json", "trustStore": "truststore"}, base_dir=tmp_path
    )
    return await verifier.verify(_subject(image), registry, Limits())


async def _notation_reason(
    tmp_path: Path, trusted: TestNotary, signer: TestNotary, media_type: str = JWS, **kw: str
) -> str:
    result = await _notation_check(tmp_path, trusted, signer, media_type, **kw)
    assert not result.ok
    return result.reason


def _subject(image: cs.Artifact) -> Subject:
    return Subject(
        registry="registry.example.test",
        repository="app",
        digest=image.digest,
        media_type=image.media_type,
        size=len(image.manifest),
    )


def _notary_signer(
    notary: TestNotary, name: str, *, issuer: Issued, intermediates: list[Issued], **cert: object
) -> TestNotary:
    """A signer whose leaf ``issuer`` issued, presenting ``intermediates`` in x5c."""
    signer = copy.copy(notary)
    key = new_key("rsa")
    options: dict[str, object] = {"key_usage": "sign", "eku": [CODE_SIGNING], **cert}
    signer.leaf = issue(name, issuer=issuer, key=key, **options).cert  # type: ignore[arg-type]
    signer.key = key
    signer.intermediates = [i.cert for i in intermediates]
    signer.identity = f"x509.subject:CN={name},O=pullgate,C=US"
    return signer


def _notary_root(notary: TestNotary) -> Issued:
    return Issued(notary.root, notary.root_key)


@pytest.mark.parametrize("media_type", [JWS, COSE])
async def test_refuses_leaf_used_as_intermediate_for_notation_signature(
    tmp_path: Path, media_type: str
) -> None:
    notary = TestNotary()
    legitimate = Issued(notary.leaf, notary.key)  # basicConstraints cA:false, code signing
    forged = _notary_signer(notary, "forged", issuer=legitimate, intermediates=[legitimate])
    reason = await _notation_reason(tmp_path, notary, forged, media_type)
    assert "does not verify to the trust store" in reason
    assert NOT_A_CA in reason


async def test_refuses_notation_chain_through_ca_without_code_signing_eku(tmp_path: Path) -> None:
    notary = TestNotary()
    tls_ca = issue(
        "tls ca", issuer=_notary_root(notary), ca=True, key_usage="ca", eku=[SERVER_AUTH]
    )
    signer = _notary_signer(notary, "signer", issuer=tls_ca, intermediates=[tls_ca])
    reason = await _notation_reason(tmp_path, notary, signer)
    assert "extended key usage does not include code signing" in reason


async def test_refuses_notation_path_length_violation(tmp_path: Path) -> None:
    notary = TestNotary()  # its root has pathLenConstraint 1: one intermediate at most
    first = issue("first ca", issuer=_notary_root(notary), ca=True, key_usage="ca")
    second = issue("second ca", issuer=first, ca=True, key_usage="ca")
    allowed = _notary_signer(notary, "allowed", issuer=first, intermediates=[first])
    accepted = await _notation_check(tmp_path / "ok", notary, allowed)
    assert accepted.ok, accepted.reason
    signer = _notary_signer(notary, "too deep", issuer=second, intermediates=[second, first])
    reason = await _notation_reason(tmp_path / "deep", notary, signer)
    assert "path length constraint violated" in reason


async def test_refuses_notation_certificate_expired_at_signing_time(tmp_path: Path) -> None:
    notary = TestNotary()
    signer = _notary_signer(
        notary,
        "expired",
        issuer=_notary_root(notary),
        intermediates=[],
        not_before=dt.datetime.now(UTC) - dt.timedelta(days=10),
        lifetime=dt.timedelta(days=1),
    )
    assert "is not valid at" in await _notation_reason(tmp_path, notary, signer)


async def test_refuses_notation_signing_certificate_that_is_a_ca(tmp_path: Path) -> None:
    notary = TestNotary()
    signer = _notary_signer(
        notary, "ca signer", issuer=_notary_root(notary), intermediates=[], ca=True
    )
    assert "basicConstraints asserts cA" in await _notation_reason(tmp_path, notary, signer)


async def test_refuses_notation_signing_certificate_with_tls_eku(tmp_path: Path) -> None:
    notary = TestNotary()
    signer = _notary_signer(
        notary,
        "tls signer",
        issuer=_notary_root(notary),
        intermediates=[],
        eku=[CODE_SIGNING, SERVER_AUTH],
    )
    reason = await _notation_reason(tmp_path, notary, signer)
    assert f"must not list {SERVER_AUTH.dotted_string}" in reason


async def test_refuses_untrusted_expired_chain_when_expiry_is_only_logged(tmp_path: Path) -> None:
    # permissive: authenticTimestamp is only logged, authenticity is still enforced. An
    # expired certificate from a rogue CA must not slip through on the logged time check.
    trusted, rogue = TestNotary(), TestNotary()
    expired = {"not_before": dt.datetime.now(UTC) - dt.timedelta(hours=12)}
    lapsed = dt.timedelta(hours=1)
    signer = _notary_signer(
        trusted,
        "signer",
        issuer=_notary_root(trusted),
        intermediates=[],
        lifetime=lapsed,
        **expired,
    )
    logged = await _notation_check(tmp_path / "trusted", trusted, signer, level="permissive")
    assert logged.ok, logged.reason
    forged = _notary_signer(
        rogue, "signer", issuer=_notary_root(rogue), intermediates=[], lifetime=lapsed, **expired
    )
    reason = await _notation_reason(tmp_path / "rogue", trusted, forged, level="permissive")
    assert "does not reach a certificate in the trust store" in reason


# ---- cosign keyless (legacy signatures, chained by pullgate) -------------------------


async def _cosign_check(
    tmp_path: Path,
    sigstore: cs.TestSigstore,
    key: cs.TestKey,
    certificate: x509.Certificate,
    chain: list[x509.Certificate],
) -> CheckResult:
    """A legacy keyless signature by ``key`` with ``certificate`` and the ``chain``
    annotation, logged in the trusted Rekor; the reason it is refused."""
    image = cs.image_manifest([b"keyless chain layer"])
    layer = sigstore.sign_layer_keyless(
        key, cs.simple_signing_payload(image.digest), certificate=certificate
    )
    pem = serialization.Encoding.PEM
    annotations = dict(layer.annotations)
    annotations["dev.sigstore.cosign/chain"] = b"".join(c.public_bytes(pem) for c in chain).decode()
    registry = cs.MemoryRegistry()
    registry.add(image)
    registry.add(cs.signature_image(image.digest, [cs.SignatureLayer(layer.payload, annotations)]))
    # The Fulcio intermediate is not an anchor: only the chain annotation can supply it.
    root = sigstore.write_trusted_root(tmp_path / "trusted_root.json", include_intermediate=False)
    verifier = cosign_verifier_from_spec(
        {"keyless": {"issuer": "https://issuer.example.test", "subject": "signer@example.test"}},
        base_dir=tmp_path,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    return await verifier.verify(_subject(image), registry, Limits())


async def _cosign_reason(*args: Any) -> str:
    result = await _cosign_check(*args)
    assert not result.ok
    return result.reason


async def test_generated_keyless_chain_verifies(tmp_path: Path) -> None:
    sigstore = cs.TestSigstore(epoch=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    key = cs.generate_key()
    certificate = sigstore.issue_certificate(key)
    result = await _cosign_check(tmp_path, sigstore, key, certificate, [sigstore.intermediate_cert])
    assert result.ok, result.reason


async def test_refuses_leaf_used_as_intermediate_for_cosign_keyless_signature(
    tmp_path: Path,
) -> None:
    sigstore = cs.TestSigstore(epoch=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    fulcio = Issued(sigstore.intermediate_cert, sigstore.intermediate_key)
    # A named signing certificate (Fulcio's own have an empty subject, which cryptography
    # already refuses as an issuer name): code signing, basicConstraints cA:false.
    legitimate = issue("legit", issuer=fulcio, ca=False, key_usage="sign", eku=[CODE_SIGNING])
    forger_key = cs.generate_key()
    forged = reissue_certificate(
        sigstore.issue_certificate(forger_key, sct=False), key=forger_key.private, issuer=legitimate
    )
    chain = [legitimate.cert, sigstore.intermediate_cert]
    reason = await _cosign_reason(tmp_path, sigstore, forger_key, forged.cert, chain)
    assert "does not chain to a trusted CA" in reason
    assert NOT_A_CA in reason


async def test_refuses_cosign_chain_through_ca_without_code_signing_eku(tmp_path: Path) -> None:
    sigstore = cs.TestSigstore(epoch=dt.datetime.now(UTC) - dt.timedelta(minutes=1))
    root = Issued(sigstore.root_cert, sigstore.root_key)
    tls_ca = issue("tls ca", issuer=root, ca=True, key_usage="ca", eku=[SERVER_AUTH])
    key = cs.generate_key()
    signer = reissue_certificate(
        sigstore.issue_certificate(key, sct=False), key=key.private, issuer=tls_ca
    )
    reason = await _cosign_reason(tmp_path, sigstore, key, signer.cert, [tls_ca.cert])
    assert "extended key usage does not include code signing" in reason
