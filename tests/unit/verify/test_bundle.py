"""Sigstore bundles attached as referrers, made by the test signer."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from proxy.verify.base import CheckResult, Limits, SignatureError, Subject, TrustConfig
from proxy.verify.bundle import CosignPolicy, dsse_pae, verify_bundle
from proxy.verify.cosign import CosignVerifier, cosign_verifier_from_spec
from proxy.verify.keys import load_public_key_pem
from tests.support.cosign_sign import (
    Artifact,
    MemoryRegistry,
    TestKey,
    TestSigstore,
    bundle_referrer,
    dsse_bundle,
    dsse_envelope,
    generate_key,
    image_manifest,
    in_toto_statement,
    message_signature_bundle,
    sign_statement,
)

ISSUER = "https://issuer.example.test"
IDENTITY = "signer@example.test"
PREDICATE = "https://cosign.sigstore.dev/attestation/v1"


@pytest.fixture(scope="module")
def key() -> TestKey:
    return generate_key()


@pytest.fixture(scope="module")
def sigstore() -> TestSigstore:
    return TestSigstore()


@pytest.fixture
def image() -> Artifact:
    return image_manifest([b"bundle-layer"])


def _subject(image: Artifact) -> Subject:
    return Subject("registry.test", "app", image.digest, image.media_type, len(image.manifest))


def _registry(
    image: Artifact, *bundles: bytes, predicate_type: str | None = None
) -> MemoryRegistry:
    registry = MemoryRegistry()
    registry.add(image)
    for bundle in bundles:
        registry.add(bundle_referrer(bundle, image.descriptor, predicate_type=predicate_type))
    return registry


def _key_verifier(tmp_path: Path, key: TestKey, **spec: Any) -> CosignVerifier:
    key.write_public(tmp_path / "keys" / "release.pub")
    root = spec.pop("root", None)
    verifier = cosign_verifier_from_spec(
        {"key": "keys/release.pub", **spec},
        base_dir=tmp_path,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    assert isinstance(verifier, CosignVerifier)
    return verifier


def _keyless_verifier(
    tmp_path: Path, sigstore: TestSigstore, *, subject: str = IDENTITY, **spec: Any
) -> CosignVerifier:
    root = sigstore.write_trusted_root(tmp_path / "trust" / "trusted_root.json")
    verifier = cosign_verifier_from_spec(
        {"keyless": {"issuer": ISSUER, "subject": subject}, "tlog": "required", **spec},
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
) -> CheckResult:
    return await verifier.verify(_subject(image), registry, limits or Limits())


# ---- public-key bundles: messageSignature ---------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa-p256", "rsa", "ed25519"])
async def test_key_message_signature_bundle_verifies(
    tmp_path: Path, image: Artifact, kind: str
) -> None:
    signer = generate_key(kind)
    bundle = message_signature_bundle(signer, image.digest, manifest=image.manifest)
    result = await _run(_key_verifier(tmp_path, signer), image, _registry(image, bundle))
    assert result.ok, result.reason
    assert "bundle verified" in result.reason


async def test_refuses_bundle_by_wrong_key(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    bundle = message_signature_bundle(generate_key(), image.digest)
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert "bundle signature does not verify with the ECDSA secp256r1 key" in result.reason


async def test_refuses_bundle_with_other_message_digest(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    other = Digest.of(b"another manifest")
    bundle = message_signature_bundle(key, image.digest, message_digest=bytes.fromhex(other.hex))
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert "message digest does not match the manifest digest" in result.reason


async def test_refuses_bundle_signing_other_manifest(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    """messageDigest says this image, but the signature is over another one."""
    other = image_manifest([b"other"])
    signature = base64.b64decode(
        json.loads(message_signature_bundle(key, other.digest))["messageSignature"]["signature"]
    )
    bundle = message_signature_bundle(key, image.digest, signature=signature)
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert "does not verify" in result.reason


# ---- public-key bundles: DSSE -----------------------------------------------------------


async def test_key_dsse_bundle_verifies(tmp_path: Path, key: TestKey, image: Artifact) -> None:
    bundle = dsse_bundle(key, in_toto_statement(image.digest, PREDICATE))
    verifier = _key_verifier(tmp_path, key, predicateType=PREDICATE)
    result = await _run(verifier, image, _registry(image, bundle, predicate_type=PREDICATE))
    assert result.ok, result.reason


@pytest.mark.parametrize("with_predicate", [True, False], ids=["v3.0.5+", "v2.6-v3.0.4"])
async def test_key_dsse_bundle_of_cosign_sign_verifies_as_signature(
    tmp_path: Path, key: TestKey, image: Artifact, with_predicate: bool
) -> None:
    """What ``cosign sign --new-bundle-format`` attaches satisfies a plain requirement
    (before cosign 3.0.5 its statement had no ``predicate`` at all)."""
    statement = json.loads(sign_statement(image.digest))
    if not with_predicate:
        del statement["predicate"]
    bundle = dsse_bundle(key, json.dumps(statement).encode())
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert result.ok, result.reason


@pytest.mark.parametrize(
    "predicate", [PREDICATE, "https://slsa.dev/provenance/v1", "https://spdx.dev/Document"]
)
async def test_refuses_key_dsse_attestation_as_signature(
    tmp_path: Path, key: TestKey, image: Artifact, predicate: str
) -> None:
    """An attestation about the image, by the trusted key, is not a signature of it."""
    bundle = dsse_bundle(key, in_toto_statement(image.digest, predicate))
    registry = _registry(image, bundle, predicate_type=predicate)
    result = await _run(_key_verifier(tmp_path, key), image, registry)
    assert not result.ok
    assert f"bundle is an attestation (predicate type {predicate!r})" in result.reason
    # The same bundle counts where the policy asks for that attestation.
    verifier = _key_verifier(tmp_path, key, predicateType=predicate)
    assert (await _run(verifier, image, registry)).ok


async def test_refuses_cosign_signature_as_attestation(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    bundle = dsse_bundle(key, sign_statement(image.digest))
    verifier = _key_verifier(tmp_path, key, predicateType=PREDICATE)
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "predicate type 'https://sigstore.dev/cosign/sign/v1' is not" in result.reason


async def test_refuses_dsse_with_other_payload_type(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    bundle = dsse_bundle(key, in_toto_statement(image.digest), payload_type="application/json")
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert "payloadType 'application/json' is not in-toto" in result.reason


async def test_refuses_dsse_with_other_predicate_type(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    """GHSA-w6c6-c85g-mmv6: an attestation of one kind must not satisfy another."""
    bundle = dsse_bundle(key, in_toto_statement(image.digest, "https://slsa.dev/provenance/v1"))
    verifier = _key_verifier(tmp_path, key, predicateType=PREDICATE)
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "predicate type 'https://slsa.dev/provenance/v1' is not" in result.reason


async def test_refuses_dsse_statement_about_other_digest(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    bundle = dsse_bundle(key, in_toto_statement(Digest.of(b"other")))
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert f"in-toto statement is not about {image.digest}" in result.reason


async def test_refuses_dsse_signature_over_other_payload(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    envelope = dsse_envelope(key, in_toto_statement(Digest.of(b"other")))
    envelope["payload"] = base64.b64encode(in_toto_statement(image.digest)).decode()
    bundle = dsse_bundle(key, b"", envelope=envelope)
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert "DSSE signature does not verify" in result.reason


def test_pae_matches_the_dsse_spec() -> None:
    assert dsse_pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# ---- public-key bundles with a transparency log entry ------------------------------------


def _logged_key_bundle(
    sigstore: TestSigstore,
    key: TestKey,
    image: Artifact,
    *,
    bind_to: bytes | None = None,
    **entry_options: Any,
) -> bytes:
    signature = base64.b64decode(
        json.loads(message_signature_bundle(key, image.digest))["messageSignature"]["signature"]
    )
    body = sigstore.hashedrekord_body(
        digest_hex=image.digest.hex, signature=bind_to or signature, signer_pem=key.public_pem
    )
    entry = sigstore.tlog_entry(body, kind="hashedrekord", **entry_options)
    return message_signature_bundle(key, image.digest, signature=signature, tlog_entries=[entry])


@pytest.mark.parametrize(
    ("options", "ok"),
    [({}, True), ({"with_set": False}, True), ({"with_proof": False}, True)],
)
async def test_key_bundle_with_tlog_entry_verifies(
    tmp_path: Path,
    sigstore: TestSigstore,
    key: TestKey,
    image: Artifact,
    options: dict[str, bool],
    ok: bool,
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    bundle = _logged_key_bundle(sigstore, key, image, **options)
    result = await _run(verifier, image, _registry(image, bundle))
    assert result.ok is ok, result.reason


async def test_refuses_key_bundle_without_tlog_entry_when_required(
    tmp_path: Path, sigstore: TestSigstore, key: TestKey, image: Artifact
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    result = await _run(
        verifier, image, _registry(image, message_signature_bundle(key, image.digest))
    )
    assert not result.ok
    assert "no transparency log entry (tlog: required)" in result.reason


async def test_refuses_bundle_tlog_entry_not_bound_to_signature(
    tmp_path: Path, sigstore: TestSigstore, key: TestKey, image: Artifact
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    other_sig = base64.b64decode(
        json.loads(message_signature_bundle(key, image.digest))["messageSignature"]["signature"]
    )
    bundle = _logged_key_bundle(sigstore, key, image, bind_to=other_sig)
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "not bound to signature" in result.reason


async def test_refuses_bundle_tlog_entry_from_untrusted_log(
    tmp_path: Path, sigstore: TestSigstore, key: TestKey, image: Artifact
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    bundle = _logged_key_bundle(TestSigstore(), key, image)
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "not in the trusted root" in result.reason


async def test_key_dsse_bundle_with_tlog_entry_binds_payload(
    tmp_path: Path, sigstore: TestSigstore, key: TestKey, image: Artifact
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    verifier = _key_verifier(tmp_path, key, tlog="required", root=root)
    envelope = dsse_envelope(key, sign_statement(image.digest))
    good_entry = sigstore.tlog_entry(
        sigstore.dsse_body(envelope=envelope, signer_pem=key.public_pem), kind="dsse"
    )
    good = dsse_bundle(key, b"", envelope=envelope, tlog_entries=[good_entry])
    assert (await _run(verifier, image, _registry(image, good))).ok
    other_envelope = dsse_envelope(key, sign_statement(Digest.of(b"other image")))
    spliced_entry = sigstore.tlog_entry(
        sigstore.dsse_body(envelope=other_envelope, signer_pem=key.public_pem), kind="dsse"
    )
    spliced = dsse_bundle(key, b"", envelope=envelope, tlog_entries=[spliced_entry])
    result = await _run(verifier, image, _registry(image, spliced))
    assert not result.ok
    assert "not bound to payload" in result.reason


# ---- certificate bundles (sigstore-python, synthetic trusted root) ------------------------


async def test_certificate_bundle_verifies_with_sigstore_python(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    bundle = sigstore.certificate_bundle(generate_key(), image.digest)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert result.ok, result.reason


async def test_certificate_dsse_bundle_verifies_with_sigstore_python(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    bundle = sigstore.certificate_bundle(
        generate_key(), image.digest, statement=in_toto_statement(image.digest, PREDICATE)
    )
    verifier = _keyless_verifier(tmp_path, sigstore, predicateType=PREDICATE)
    result = await _run(verifier, image, _registry(image, bundle))
    assert result.ok, result.reason


async def test_certificate_dsse_bundle_of_cosign_sign_verifies_as_signature(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    bundle = sigstore.certificate_bundle(
        generate_key(), image.digest, statement=sign_statement(image.digest)
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert result.ok, result.reason


async def test_refuses_certificate_dsse_attestation_as_signature(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    provenance = "https://slsa.dev/provenance/v1"
    bundle = sigstore.certificate_bundle(
        generate_key(), image.digest, statement=in_toto_statement(image.digest, provenance)
    )
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert not result.ok
    assert f"bundle is an attestation (predicate type {provenance!r})" in result.reason


async def test_refuses_certificate_dsse_bundle_with_other_predicate(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    bundle = sigstore.certificate_bundle(
        generate_key(), image.digest, statement=in_toto_statement(image.digest, "https://x/v1")
    )
    verifier = _keyless_verifier(tmp_path, sigstore, predicateType=PREDICATE)
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "predicate type" in result.reason


async def test_refuses_certificate_bundle_for_other_identity(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    bundle = sigstore.certificate_bundle(generate_key(), image.digest)
    verifier = _keyless_verifier(tmp_path, sigstore, subject="regexp:^someone@")
    result = await _run(verifier, image, _registry(image, bundle))
    assert not result.ok
    assert "does not match regexp:^someone@" in result.reason


async def test_refuses_certificate_bundle_from_untrusted_ca(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    rogue = TestSigstore(rekor=sigstore.rekor, ct=sigstore.ct)
    bundle = rogue.certificate_bundle(generate_key(), image.digest)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert not result.ok
    assert "chain" in result.reason


async def test_refuses_certificate_bundle_over_other_digest(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    other = image_manifest([b"other"])
    bundle = sigstore.certificate_bundle(generate_key(), other.digest)
    # A referrer that claims to be about this image but whose bundle signs another one.
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert not result.ok
    assert "digest mismatch" in result.reason


async def test_refuses_bare_public_key_bundle_where_certificate_required(
    tmp_path: Path, sigstore: TestSigstore, key: TestKey, image: Artifact
) -> None:
    """GHSA-fx35-mq7g-6g98: a keyless policy must not accept a key-signed bundle."""
    bundle = message_signature_bundle(key, image.digest)
    result = await _run(_keyless_verifier(tmp_path, sigstore), image, _registry(image, bundle))
    assert not result.ok
    assert "bare public key where a certificate is required" in result.reason


async def test_refuses_certificate_bundle_under_key_policy(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact
) -> None:
    signer = generate_key()
    bundle = sigstore.certificate_bundle(signer, image.digest)
    result = await _run(_key_verifier(tmp_path, signer), image, _registry(image, bundle))
    assert not result.ok
    assert "carries a certificate, but the policy requires a key" in result.reason


# ---- referrers: spoofing and limits -----------------------------------------------------------


async def test_refuses_referrer_whose_subject_is_another_digest(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    other = image_manifest([b"other"])
    registry = _registry(image)
    referrer = bundle_referrer(message_signature_bundle(key, image.digest), other.descriptor)
    registry.add(referrer)
    # The registry lists it under our image although its subject is the other one.
    registry.spoofed_referrers[image.digest] = [referrer.descriptor]
    result = await _run(_key_verifier(tmp_path, key), image, registry)
    assert not result.ok
    assert "bundle referrer is about another manifest (subject mismatch)" in result.reason
    assert registry.fetched_blobs == []


async def test_oversize_bundle_is_refused_without_fetching(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    registry = _registry(image)
    bundle = message_signature_bundle(key, image.digest)
    referrer = bundle_referrer(bundle, image.descriptor)
    doc = json.loads(referrer.manifest)
    doc["layers"][0]["size"] = 100 * 1024 * 1024  # a 100 MB bundle
    registry.add(Artifact(json.dumps(doc).encode(), mt.OCI_MANIFEST, referrer.blobs))
    result = await _run(_key_verifier(tmp_path, key), image, registry)
    assert not result.ok
    assert "bundle of 104857600 bytes exceeds the cap of 1048576" in result.reason
    assert registry.fetched_blobs == []


async def test_bundle_larger_than_declared_is_refused_by_source_cap(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    big = message_signature_bundle(key, image.digest) + b" " * 5000
    registry = _registry(image, big)
    result = await _run(
        _key_verifier(tmp_path, key), image, registry, Limits(max_bundle_bytes=4096)
    )
    assert not result.ok
    assert "exceeds the cap" in result.reason


async def test_referrer_flood_is_bounded_by_max_signatures(
    tmp_path: Path, key: TestKey, image: Artifact
) -> None:
    registry = _registry(image)
    wrong = generate_key()
    for i in range(200):
        bundle = message_signature_bundle(wrong, image.digest) + b" " * i
        registry.add(bundle_referrer(bundle, image.descriptor))
    registry.add(bundle_referrer(message_signature_bundle(key, image.digest), image.descriptor))
    limits = Limits(max_signatures=8)
    result = await _run(_key_verifier(tmp_path, key), image, registry, limits)
    manifests_fetched = [r for r in registry.fetched_manifests if r.startswith("sha256:")]
    assert len(manifests_fetched) <= 8
    assert len(registry.fetched_blobs) <= 8
    assert not result.ok  # the good bundle is the 201st
    assert len(result.reason) <= 600
    assert "only the first 8 bundles were examined" in result.reason


@pytest.mark.parametrize(
    ("bundle", "why"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}', "verificationMaterial"),
        (
            json.dumps(
                {
                    "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                    "verificationMaterial": {"publicKey": {}},
                    "messageSignature": {"signature": "%%%"},
                }
            ).encode(),
            "base64",
        ),
        (
            json.dumps(
                {
                    "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                    "verificationMaterial": {"publicKey": {}},
                    "dsseEnvelope": {"payloadType": 5},
                }
            ).encode(),
            "payloadType",
        ),
        (
            json.dumps(
                {
                    "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                    "verificationMaterial": {"publicKey": {}},
                }
            ).encode(),
            "exactly one of",
        ),
    ],
)
async def test_malformed_key_bundle_fails_cleanly(
    tmp_path: Path, key: TestKey, image: Artifact, bundle: bytes, why: str
) -> None:
    result = await _run(_key_verifier(tmp_path, key), image, _registry(image, bundle))
    assert not result.ok
    assert why in result.reason


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["verificationMaterial"]["certificate"].update(rawBytes="AAAA"),
        lambda d: d["verificationMaterial"].update(tlogEntries="nope"),
        lambda d: d["verificationMaterial"]["tlogEntries"][0].update(canonicalizedBody="%%"),
        lambda d: d["messageSignature"].update(signature=None),
        lambda d: d.update(messageSignature=[]),
    ],
)
async def test_malformed_certificate_bundle_fails_cleanly(
    tmp_path: Path, sigstore: TestSigstore, image: Artifact, mutate: Any
) -> None:
    doc = json.loads(sigstore.certificate_bundle(generate_key(), image.digest))
    mutate(doc)
    result = await _run(
        _keyless_verifier(tmp_path, sigstore), image, _registry(image, json.dumps(doc).encode())
    )
    assert not result.ok
    assert result.reason.startswith("no cosign signature verified with keyless")


def test_verify_bundle_checks_artifact_bytes_against_digest(key: TestKey, image: Artifact) -> None:
    policy = CosignPolicy(key=load_public_key_pem(key.public_pem))
    bundle = message_signature_bundle(key, image.digest)
    assert verify_bundle(
        bundle, artifact_digest=image.digest, artifact=image.manifest, policy=policy
    )
    with pytest.raises(SignatureError, match="do not match the artifact digest"):
        verify_bundle(bundle, artifact_digest=image.digest, artifact=b"other", policy=policy)


def test_referrer_descriptor_helpers_are_consistent(key: TestKey, image: Artifact) -> None:
    referrer = bundle_referrer(message_signature_bundle(key, image.digest), image.descriptor)
    doc = json.loads(referrer.manifest)
    assert doc["subject"]["digest"] == str(image.digest)
    assert doc["artifactType"] == mt.SIGSTORE_BUNDLE_V03
    assert isinstance(referrer.descriptor, Descriptor)
    assert hashlib.sha256(referrer.manifest).hexdigest() == referrer.digest.hex
