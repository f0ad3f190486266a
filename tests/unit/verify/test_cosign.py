"""Legacy cosign signatures (``sha256-<hex>.sig``) made by the test signer."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.oci.digest import Digest
from proxy.verify.base import CheckResult, Limits, PolicyError, Subject, TrustConfig
from proxy.verify.cosign import CosignVerifier, cosign_verifier_from_spec, reference_matches
from tests.support.cosign_sign import (
    Artifact,
    MemoryRegistry,
    SignatureLayer,
    TestKey,
    TestSigstore,
    generate_key,
    image_manifest,
    push_artifact,
    sign_layer,
    signature_image,
    simple_signing_payload,
)

ISSUER = "https://issuer.example.test"
IDENTITY = "signer@example.test"


@pytest.fixture(scope="module")
def key() -> TestKey:
    return generate_key()


@pytest.fixture(scope="module")
def sigstore() -> TestSigstore:
    return TestSigstore()


@pytest.fixture
def image() -> Artifact:
    return image_manifest([b"layer-1", b"layer-2"])


def _subject(image: Artifact, repo: str = "app") -> Subject:
    return Subject("registry.test", repo, image.digest, image.media_type, len(image.manifest))


def _registry(image: Artifact, layers: list[SignatureLayer]) -> MemoryRegistry:
    registry = MemoryRegistry()
    registry.add(image)
    registry.add(signature_image(image.digest, layers))
    return registry


def _key_verifier(tmp_path: Path, key: TestKey, **spec: Any) -> CosignVerifier:
    key.write_public(tmp_path / "keys" / "release.pub")
    trust = TrustConfig(sigstore_trusted_root=spec.pop("root", None))
    verifier = cosign_verifier_from_spec(
        {"key": "keys/release.pub", **spec}, base_dir=tmp_path, trust=trust
    )
    assert isinstance(verifier, CosignVerifier)
    return verifier


def _keyless_verifier(
    tmp_path: Path,
    sigstore: TestSigstore,
    *,
    subject: str = IDENTITY,
    issuer: str = ISSUER,
    tlog: str = "required",
    **root_options: Any,
) -> CosignVerifier:
    root = sigstore.write_trusted_root(tmp_path / "trust" / "trusted_root.json", **root_options)
    verifier = cosign_verifier_from_spec(
        {"keyless": {"issuer": issuer, "subject": subject}, "tlog": tlog},
        base_dir=tmp_path,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    assert isinstance(verifier, CosignVerifier)
    return verifier


async def _run(
    verifier: CosignVerifier,
    image: Artifact,
    registry: MemoryRegistry,
    limits: Limits | None = None,
    repo: str = "app",
) -> CheckResult:
    return await verifier.verify(_subject(image, repo), registry, limits or Limits())


# ---- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ecdsa-p384", "rsa", "rsa-pss", "ed25519"])
async def test_key_signature_verifies(tmp_path: Path, image: Artifact, kind: str) -> None:
    signer = generate_key(kind)
    layer = sign_layer(signer, simple_signing_payload(image.digest))
    result = await _run(_key_verifier(tmp_path, signer), image, _registry(image, [layer]))
    assert result.ok, result.reason
    assert result.reason.startswith("cosign key keys/release.pub")


async def test_refuses_unsigned_image(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    registry = MemoryRegistry()
    registry.add(image)
    result = await _run(_key_verifier(tmp_path, key), image, registry)
    assert not result.ok
    assert result.reason == (
        "no cosign signature verified with key keys/release.pub: no signatures found"
    )


async def test_refuses_signature_by_wrong_key(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    layer = sign_layer(generate_key(), simple_signing_payload(image.digest))
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, [layer]))
    assert not result.ok
    assert "signature does not verify with the ECDSA secp256r1 key" in result.reason


async def test_refuses_signature_over_other_digest(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    other = image_manifest([b"other"])
    layer = sign_layer(key, simple_signing_payload(other.digest))
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, [layer]))
    assert not result.ok
    assert "payload digest does not match" in result.reason
    assert result.reason.startswith(
        "no cosign signature verified with key keys/release.pub: payload digest does not match"
    )


async def test_refuses_tampered_manifest(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    """The signature image of the original, served next to altered manifest bytes."""
    layer = sign_layer(key, simple_signing_payload(image.digest))
    tampered = Artifact(image.manifest.replace(b"layer", b"LAYER", 1) + b" ", image.media_type, ())
    registry = _registry(image, [layer])
    # A tampered manifest has another digest, so its .sig tag is not the original's.
    result = await _run(_key_verifier(tmp_path, key), tampered, registry)
    assert not result.ok
    # Even a registry that serves the original's signature under the tampered digest fails.
    registry.add(signature_image(tampered.digest, [layer]))
    result = await _run(_key_verifier(tmp_path, key), tampered, registry)
    assert not result.ok
    assert "payload digest does not match" in result.reason


async def test_refuses_tampered_payload(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    layer = sign_layer(key, simple_signing_payload(image.digest))
    forged = SignatureLayer(
        layer.payload.replace(b"registry.test", b"registry.evil"), layer.annotations
    )
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, [forged]))
    assert not result.ok
    assert "signature does not verify" in result.reason


async def test_refuses_payload_of_other_type(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    payload = simple_signing_payload(image.digest, signature_type="atomic container signature")
    result = await _run(
        _key_verifier(tmp_path, key), image, _registry(image, [sign_layer(key, payload)])
    )
    assert not result.ok
    assert "is not a cosign signature" in result.reason


async def test_one_valid_signature_among_bad_ones_is_enough(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    good = sign_layer(key, simple_signing_payload(image.digest))
    bad = sign_layer(generate_key(), simple_signing_payload(image.digest, "registry.test/x"))
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, [bad, good]))
    assert result.ok, result.reason


async def test_reference_policy(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    layer = sign_layer(key, simple_signing_payload(image.digest, "registry.test/app"))
    registry = _registry(image, [layer])
    exact = _key_verifier(tmp_path, key, reference="exact")
    assert (await _run(exact, image, registry)).ok
    refused = await _run(exact, image, registry, repo="other")
    assert not refused.ok
    assert "docker-reference 'registry.test/app' does not match registry.test/other" in (
        refused.reason
    )


def test_reference_matching_normalises_docker_hub() -> None:
    subject = Subject("docker.io", "library/alpine", Digest.of(b""), "x", 0)
    assert reference_matches("alpine", subject, exact=True)
    assert reference_matches("docker.io/library/alpine:3", subject, exact=False)
    assert not reference_matches("docker.io/library/alpine:3", subject, exact=True)
    assert not reference_matches("docker.io/evil/alpine", subject, exact=False)


# ---- keyless -----------------------------------------------------------------------------


async def test_keyless_signature_verifies_at_log_time(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    layer = sigstore.sign_layer_keyless(signer, simple_signing_payload(image.digest))
    verifier = _keyless_verifier(tmp_path, sigstore)
    assert verifier.describe() == f"cosign keyless issuer={ISSUER} subject={IDENTITY}"
    result = await _run(verifier, image, _registry(image, [layer]))
    assert result.ok, result.reason


async def test_keyless_regexp_identity(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    layer = sigstore.sign_layer_keyless(
        signer,
        simple_signing_payload(image.digest),
        identity="https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1",
        issuer="https://token.actions.githubusercontent.com",
    )
    ok = _keyless_verifier(
        tmp_path,
        sigstore,
        subject="regexp:^https://github.com/acme/",
        issuer="https://token.actions.githubusercontent.com",
    )
    assert (await _run(ok, image, _registry(image, [layer]))).ok
    other = _keyless_verifier(
        tmp_path,
        sigstore,
        subject="regexp:^https://github.com/evil/",
        issuer="https://token.actions.githubusercontent.com",
    )
    result = await _run(other, image, _registry(image, [layer]))
    assert not result.ok
    assert "does not match regexp:^https://github.com/evil/" in result.reason


@pytest.mark.parametrize(
    ("subject", "issuer", "why"),
    [
        (
            "someone@example.test",
            ISSUER,
            "certificate identity (signer@example.test) does not match",
        ),
        (IDENTITY, "https://other-issuer.test", "certificate issuer"),
    ],
)
async def test_refuses_keyless_identity_mismatch(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, subject: str, issuer: str, why: str
) -> None:
    layer = sigstore.sign_layer_keyless(generate_key(), simple_signing_payload(image.digest))
    verifier = _keyless_verifier(tmp_path, sigstore, subject=subject, issuer=issuer)
    result = await _run(verifier, image, _registry(image, [layer]))
    assert not result.ok
    assert why in result.reason


async def test_refuses_certificate_without_issuer_extension(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    layer = sigstore.sign_layer_keyless(
        generate_key(), simple_signing_payload(image.digest), issuer=None
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "no OIDC issuer extension" in result.reason


async def test_refuses_certificate_from_untrusted_ca(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    rogue = TestSigstore(rekor=sigstore.rekor)  # same log, another CA
    layer = rogue.sign_layer_keyless(generate_key(), simple_signing_payload(image.digest))
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "does not chain to a trusted CA" in result.reason


async def test_refuses_certificate_expired_at_log_time(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    cert = sigstore.issue_certificate(signer)
    late = int(cert.not_valid_after_utc.timestamp()) + 60
    layer = sigstore.sign_layer_keyless(
        signer, simple_signing_payload(image.digest), certificate=cert, integrated_time=late
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "does not chain to a trusted CA" in result.reason


async def test_refuses_certificate_not_yet_valid_at_log_time(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    cert = sigstore.issue_certificate(signer, not_before=sigstore.epoch + dt.timedelta(hours=1))
    early = int(sigstore.epoch.timestamp())
    layer = sigstore.sign_layer_keyless(
        signer, simple_signing_payload(image.digest), certificate=cert, integrated_time=early
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "does not chain" in result.reason


async def test_refuses_expired_certificate_without_log_time(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    """With tlog optional and no SET, only "now" can be checked: a 10-minute cert is expired."""
    layer = sigstore.sign_layer_keyless(
        generate_key(), simple_signing_payload(image.digest), with_set=False
    )
    verifier = _keyless_verifier(tmp_path, sigstore, tlog="optional")
    result = await _run(verifier, image, _registry(image, [layer]))
    assert not result.ok
    assert "does not chain" in result.reason


async def test_refuses_certificate_not_for_code_signing(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    layer = sigstore.sign_layer_keyless(
        generate_key(), simple_signing_payload(image.digest), code_signing=False
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "not for code signing" in result.reason


async def test_refuses_keyless_signature_by_other_key_than_certificate(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer, impostor = generate_key(), generate_key()
    cert = sigstore.issue_certificate(signer)
    payload = simple_signing_payload(image.digest)
    layer = sigstore.sign_layer_keyless(impostor, payload, certificate=cert)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "signature does not verify" in result.reason


async def test_refuses_bare_public_key_in_certificate_annotation(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, key: TestKey
) -> None:
    payload = simple_signing_payload(image.digest)
    layer = sign_layer(key, payload)
    layer.annotations["dev.sigstore.cosign/certificate"] = key.public_pem.decode()
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "not a PEM certificate" in result.reason or "no certificate found" in result.reason


# ---- Rekor SETs ------------------------------------------------------------------------


def _set_doc(layer: SignatureLayer) -> dict[str, Any]:
    return dict(json.loads(layer.annotations["dev.sigstore.cosign/bundle"]))


async def test_refuses_missing_set_when_tlog_required(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    layer = sigstore.sign_layer_keyless(
        generate_key(), simple_signing_payload(image.digest), with_set=False
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "no Rekor bundle (tlog: required)" in result.reason


async def test_refuses_garbled_set(tmp_path: Path, sigstore: TestSigstore, image: Artifact) -> None:
    layer = sigstore.sign_layer_keyless(generate_key(), simple_signing_payload(image.digest))
    doc = _set_doc(layer)
    doc["Payload"]["logIndex"] += 1
    layer.annotations["dev.sigstore.cosign/bundle"] = json.dumps(doc)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "SET signature does not verify" in result.reason


async def test_refuses_set_from_untrusted_log(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    other_log = TestSigstore(root_key=sigstore.root_key, intermediate_key=sigstore.intermediate_key)
    other_log.root_cert, other_log.intermediate_cert = (
        sigstore.root_cert,
        sigstore.intermediate_cert,
    )
    layer = other_log.sign_layer_keyless(generate_key(), simple_signing_payload(image.digest))
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "is not in the trusted root" in result.reason


async def test_refuses_rekor_entry_not_bound_to_signature(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    """CVE-2026-22703 / CVE-2022-23649: a genuine SET for another signature is no proof."""
    signer = generate_key()
    cert = sigstore.issue_certificate(signer)
    payload = simple_signing_payload(image.digest)
    first = sigstore.sign_layer_keyless(signer, payload, certificate=cert)
    second = sigstore.sign_layer_keyless(signer, payload, certificate=cert)  # new ECDSA sig
    spliced = dict(second.annotations)
    spliced["dev.sigstore.cosign/bundle"] = first.annotations["dev.sigstore.cosign/bundle"]
    layer = SignatureLayer(payload, spliced)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert "not bound to signature" in result.reason


async def test_refuses_rekor_entry_for_other_payload(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    cert = sigstore.issue_certificate(signer)
    payload = simple_signing_payload(image.digest)
    logged = sigstore.sign_layer_keyless(signer, payload + b" ", certificate=cert)
    real = sigstore.sign_layer_keyless(signer, payload, certificate=cert)
    spliced = dict(real.annotations)
    spliced["dev.sigstore.cosign/bundle"] = logged.annotations["dev.sigstore.cosign/bundle"]
    result = await _run(
        _keyless_verifier(tmp_path, sigstore),
        image,
        _registry(image, [SignatureLayer(payload, spliced)]),
    )
    assert not result.ok
    assert "not bound to payload" in result.reason


async def test_refuses_rekor_entry_naming_other_signer(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, key: TestKey
) -> None:
    """A key signature whose SET entry names someone else's key."""
    payload = simple_signing_payload(image.digest)
    layer = sign_layer(key, payload)
    signature = base64.b64decode(layer.annotations["dev.cosignproject.cosign/signature"])
    body = sigstore.hashedrekord_body(
        digest_hex=hashlib.sha256(payload).hexdigest(),
        signature=signature,
        signer_pem=generate_key().public_pem,
    )
    layer.annotations["dev.sigstore.cosign/bundle"] = sigstore.legacy_rekor_bundle(body)
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    result = await _run(verifier, image, _registry(image, [layer]))
    assert not result.ok
    assert "names another public key" in result.reason


async def test_key_signature_with_set_verifies(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, key: TestKey
) -> None:
    payload = simple_signing_payload(image.digest)
    layer = sign_layer(key, payload)
    signature = base64.b64decode(layer.annotations["dev.cosignproject.cosign/signature"])
    body = sigstore.hashedrekord_body(
        digest_hex=hashlib.sha256(payload).hexdigest(),
        signature=signature,
        signer_pem=key.public_pem,
    )
    layer.annotations["dev.sigstore.cosign/bundle"] = sigstore.legacy_rekor_bundle(body)
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    result = await _run(
        _key_verifier(tmp_path, key, tlog="required", root=root), image, _registry(image, [layer])
    )
    assert result.ok, result.reason


# ---- hostile input ----------------------------------------------------------------------


async def test_signature_flood_is_bounded_by_max_signatures(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    payload = simple_signing_payload(image.digest)
    junk = [
        SignatureLayer(
            payload + b" " * (i % 7) + str(i).encode(),
            {"dev.cosignproject.cosign/signature": base64.b64encode(b"x" * 70).decode()},
        )
        for i in range(1000)
    ]
    registry = _registry(image, [*junk, sign_layer(key, payload)])  # the good one is last
    limits = Limits(max_signatures=16, max_signature_manifest_bytes=1024 * 1024)
    result = await _run(_key_verifier(tmp_path, key), image, registry, limits)
    assert not result.ok
    assert len(registry.fetched_blobs) <= 16
    assert "only the first 16 signatures were examined" in result.reason
    assert len(result.reason) <= 600


async def test_signature_manifest_over_cap_is_refused(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    layers = [sign_layer(key, simple_signing_payload(image.digest))] * 50
    registry = _registry(image, layers)
    result = await _run(
        _key_verifier(tmp_path, key), image, registry, Limits(max_signature_manifest_bytes=1024)
    )
    assert not result.ok
    assert "signature manifest sha256-" in result.reason
    assert registry.fetched_blobs == []


async def test_oversize_payload_is_not_fetched(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    payload = simple_signing_payload(image.digest, optional={"pad": "x" * 5000})
    registry = _registry(image, [sign_layer(key, payload)])
    result = await _run(
        _key_verifier(tmp_path, key), image, registry, Limits(max_bundle_bytes=4096)
    )
    assert not result.ok
    assert f"payload of {len(payload)} bytes exceeds the cap of 4096" in result.reason
    assert registry.fetched_blobs == []


@pytest.mark.parametrize(
    ("annotations", "why"),
    [
        ({"dev.cosignproject.cosign/signature": "@@not base64@@"}, "not valid base64"),
        ({"dev.cosignproject.cosign/signature": ""}, "no signature annotation"),
    ],
)
async def test_malformed_signature_annotation_fails_cleanly(
    tmp_path: Path, key: TestKey, image: Artifact, annotations: dict[str, str], why: str
) -> None:
    layer = SignatureLayer(simple_signing_payload(image.digest), annotations)
    if not annotations["dev.cosignproject.cosign/signature"]:
        layer = SignatureLayer(layer.payload, {})
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, [layer]))
    assert not result.ok
    assert why in result.reason


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"critical": 1}',
        b'{"critical":{"type":"cosign container image signature"}}',
        b"\xff\xfe",
    ],
)
async def test_malformed_payload_fails_cleanly(
    tmp_path: Path, key: TestKey, image: Artifact, payload: bytes
) -> None:
    result = await _run(
        _key_verifier(tmp_path, key), image, _registry(image, [sign_layer(key, payload)])
    )
    assert not result.ok
    assert "payload" in result.reason


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        (
            "dev.sigstore.cosign/certificate",
            "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
            "certificate",
        ),
        ("dev.sigstore.cosign/certificate", "not pem at all", "certificate"),
        (
            "dev.sigstore.cosign/chain",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "certificate",
        ),
        ("dev.sigstore.cosign/bundle", "{", "not valid JSON"),
        ("dev.sigstore.cosign/bundle", '{"Payload": {"body": "%%%"}}', "base64"),
        ("dev.sigstore.cosign/bundle", '{"Payload": {"body": "e30=", "logID": "zz"}}', "logID"),
    ],
)
async def test_malformed_keyless_annotations_fail_cleanly(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, name: str, value: str, why: str
) -> None:
    layer = sigstore.sign_layer_keyless(generate_key(), simple_signing_payload(image.digest))
    layer.annotations[name] = value
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert why in result.reason


async def test_push_artifact_calls_sync_and_async_pushers(image: Artifact, key: TestKey) -> None:
    registry = MemoryRegistry()
    pushed: list[str] = []

    async def push_manifest(reference: str, data: bytes, media_type: str) -> None:
        pushed.append(reference)
        registry.push_manifest(reference, data, media_type)

    sig = signature_image(image.digest, [sign_layer(key, simple_signing_payload(image.digest))])
    digest = await push_artifact(sig, push_blob=registry.push_blob, push_manifest=push_manifest)
    assert pushed == [f"sha256-{image.digest.hex}.sig"]
    assert digest == sig.digest
    assert all(Digest.of(b) in registry.blobs for b in sig.blobs)


# ---- spec parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({}, "exactly one of"),
        ({"key": "k.pub", "keyless": {"issuer": "a", "subject": "b"}}, "exactly one of"),
        ({"key": "missing.pub"}, "cannot read cosign key"),
        ({"key": "k.pub", "tlog": "sometimes"}, "tlog"),
        ({"key": "k.pub", "tlog": "required"}, "sigstoreTrustedRoot"),
        ({"key": "k.pub", "reference": "fuzzy"}, "reference"),
        ({"key": "k.pub", "colour": "blue"}, "unknown keys"),
        ({"keyless": {"issuer": "a", "subject": "b"}}, "sigstoreTrustedRoot"),
        ({"keyless": "me"}, "mapping"),
        ({"keyless": {"issuer": "a", "subject": "regexp:("}}, "regular expression"),
        ({"key": "bad.pub"}, "not a PEM public key"),
        ({"key": "weak.pub"}, "too weak"),
    ],
)
def test_bad_spec_is_a_policy_error(
    tmp_path: Path, key: TestKey, spec: dict[str, Any], why: str
) -> None:
    key.write_public(tmp_path / "k.pub")
    (tmp_path / "bad.pub").write_text(
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
    )
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    (tmp_path / "weak.pub").write_bytes(
        weak.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(PolicyError, match=why):
        cosign_verifier_from_spec(spec, base_dir=tmp_path, trust=TrustConfig())


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        '{"mediaType": "nope"}',
        '{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1"}',
        '{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1", '
        '"tlogs": [{"publicKey": {"rawBytes": "%%"}}]}',
    ],
)
def test_bad_trusted_root_is_a_policy_error(tmp_path: Path, content: str) -> None:
    root = tmp_path / "root.json"
    root.write_text(content)
    with pytest.raises(PolicyError):
        cosign_verifier_from_spec(
            {"keyless": {"issuer": "a", "subject": "b"}},
            base_dir=tmp_path,
            trust=TrustConfig(sigstore_trusted_root=root),
        )


def test_missing_trusted_root_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read trusted root"):
        cosign_verifier_from_spec(
            {"keyless": {"issuer": "a", "subject": "b"}},
            base_dir=tmp_path,
            trust=TrustConfig(sigstore_trusted_root=tmp_path / "absent.json"),
        )


async def test_certificate_with_garbage_extension_fails_cleanly(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtensionOID

    signer = generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(sigstore.intermediate_cert.subject)
        .public_key(signer.public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(sigstore.epoch)
        .not_valid_after(sigstore.epoch + dt.timedelta(minutes=10))
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\xff\x00"),
            critical=True,
        )
        .sign(sigstore.intermediate_key, hashes.SHA384())
    )
    layer = sigstore.sign_layer_keyless(
        signer, simple_signing_payload(image.digest), certificate=cert
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, [layer]))
    assert not result.ok
    assert result.reason.startswith("no cosign signature verified with keyless")
