"""Real legacy cosign signatures from containers/image (vectors README section 1)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.verify.base import Limits, PolicyError, SignatureError, Subject, TrustConfig
from proxy.verify.bundle import CosignPolicy
from proxy.verify.cosign import CosignVerifier, LegacySignature, cosign_verifier_from_spec
from proxy.verify.keys import load_certificates_pem
from proxy.verify.rekor import (
    SignerIdentity,
    check_hashedrekord_binding,
    parse_legacy_bundle,
    verify_set,
)
from proxy.verify.sigstore_trust import (
    KeylessIdentity,
    Matcher,
    load_trusted_root,
    verify_certificate_chain,
)
from tests.support.cosign_sign import MemoryRegistry, SignatureLayer, signature_image

VECTORS = Path(__file__).resolve().parents[3] / ".." / "shared" / "vectors"
CI = VECTORS / "containers-image"
FIX = CI / "signature" / "fixtures"
PRD = (
    VECTORS / "sigstore-python" / "sigstore" / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
)
SIGSTORE_PREFIX = b"\x00sigstore-json\n"

pytestmark = pytest.mark.skipif(
    not CI.is_dir(), reason=f"signature vectors not found at {CI} (../shared/vectors)"
)


def _manifest_media_type(raw: bytes) -> str:
    return str(json.loads(raw or b"{}").get("mediaType") or mt.OCI_MANIFEST)


def _subject(manifest: bytes, *, registry: str = "192.168.64.2:5000", repo: str = "x") -> Subject:
    return Subject(
        registry, repo, Digest.of(manifest), _manifest_media_type(manifest), len(manifest)
    )


def _dir_layers(folder: Path) -> list[SignatureLayer]:
    layers = []
    for path in sorted(folder.glob("signature-*")):
        raw = path.read_bytes()
        if not raw.startswith(SIGSTORE_PREFIX):
            # A GPG simple-signing signature: no cosign annotations at all.
            layers.append(SignatureLayer(raw, {}, mt.COSIGN_SIMPLESIGNING))
            continue
        doc = json.loads(raw[len(SIGSTORE_PREFIX) :])
        layers.append(
            SignatureLayer(base64.b64decode(doc["payload"]), doc["annotations"], doc["mimeType"])
        )
    return layers


def _registry_for(subject_digest: Digest, layers: list[SignatureLayer]) -> MemoryRegistry:
    registry = MemoryRegistry()
    if layers:
        registry.add(signature_image(subject_digest, layers))
    return registry


def _registry_from_derived(name: str) -> MemoryRegistry:
    """A registry-shaped copy (``derived/``): the .sig manifest and its blobs, as stored."""
    folder = CI / "derived" / name
    registry = MemoryRegistry()
    for blob in (folder / "blobs" / "sha256").iterdir():
        registry.push_blob(blob.read_bytes())
    manifest_file = next(folder.glob("sha256-*.sig.manifest.json"))
    tag = manifest_file.name.removesuffix(".manifest.json")
    registry.push_manifest(tag, manifest_file.read_bytes(), mt.OCI_MANIFEST)
    return registry


def _key_verifier(key: str = "cosign.pub", **extra: object) -> CosignVerifier:
    verifier = cosign_verifier_from_spec({"key": key, **extra}, base_dir=FIX, trust=TrustConfig())
    assert isinstance(verifier, CosignVerifier)
    return verifier


def _write_root(tmp_path: Path, *, rekor_pem: Path | None, ca_pems: list[Path]) -> Path:
    """A trusted_root.json made from the loose PEM trust files of the fixtures."""
    from cryptography.hazmat.primitives import serialization

    root: dict[str, object] = {
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": [],
        "certificateAuthorities": [],
        "ctlogs": [],
        "timestampAuthorities": [],
    }
    if rekor_pem is not None:
        key = serialization.load_pem_public_key(rekor_pem.read_bytes())
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        import hashlib

        root["tlogs"] = [
            {
                "baseUrl": "https://log.test",
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": base64.b64encode(der).decode(),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": "2021-01-01T00:00:00Z"},
                },
                "logId": {"keyId": base64.b64encode(hashlib.sha256(der).digest()).decode()},
            }
        ]
    if ca_pems:
        certs = [c for pem in ca_pems for c in load_certificates_pem(pem.read_bytes())]
        root["certificateAuthorities"] = [
            {
                "subject": {"organization": "test", "commonName": "test"},
                "uri": "https://ca.test",
                "certChain": {
                    "certificates": [
                        {
                            "rawBytes": base64.b64encode(
                                c.public_bytes(serialization.Encoding.DER)
                            ).decode()
                        }
                        for c in certs
                    ]
                },
                "validFor": {"start": "2021-01-01T00:00:00Z"},
            }
        ]
    path = tmp_path / "trusted_root.json"
    path.write_text(json.dumps(root))
    return path


# ---- key-signed cases ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "dir-img-cosign-valid",
        "dir-img-cosign-valid-2",
        "dir-img-cosign-mixed",
        "dir-img-cosign-valid-with-tag",
    ],
)
async def test_key_signed_vectors_verify(case: str) -> None:
    folder = FIX / case
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await _key_verifier().verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert result.ok, result.reason


async def test_derived_registry_copy_verifies_through_sig_tag() -> None:
    manifest = (FIX / "dir-img-cosign-valid" / "manifest.json").read_bytes()
    result = await _key_verifier().verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-valid"), Limits()
    )
    assert result.ok, result.reason


async def test_mixed_reports_unknown_key_only_when_all_fail() -> None:
    folder = FIX / "dir-img-cosign-mixed"
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest)
    layers = _dir_layers(folder)[:1]  # only the signature by the unknown key
    result = await _key_verifier().verify(subject, _registry_for(subject.digest, layers), Limits())
    assert not result.ok
    assert "signature does not verify" in result.reason


@pytest.mark.parametrize(
    "case", ["dir-img-cosign-modified-manifest", "dir-img-cosign-manifest-digest-error"]
)
async def test_refuses_signature_over_other_manifest_digest(case: str) -> None:
    folder = FIX / case
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await _key_verifier().verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert not result.ok
    assert "payload digest does not match" in result.reason
    assert result.reason.startswith("no cosign signature verified with key cosign.pub")


async def test_refuses_signature_without_manifest() -> None:
    # Nothing to compare against: the only digest we could check is of no manifest at all.
    folder = FIX / "dir-img-cosign-no-manifest"
    subject = _subject(b"")
    result = await _key_verifier().verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert not result.ok
    assert "payload digest does not match" in result.reason


async def test_ignores_other_attachment_layers() -> None:
    folder = FIX / "dir-img-cosign-other-attachment"
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await _key_verifier().verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert not result.ok
    assert "no simple-signing layers" in result.reason


async def test_refuses_valid_signature_by_unknown_key() -> None:
    manifest = (FIX / "dir-img-cosign-valid" / "manifest.json").read_bytes()
    raw = (FIX / "unknown-cosign-key.signature").read_bytes()
    doc = json.loads(raw[len(SIGSTORE_PREFIX) :])
    layer = SignatureLayer(base64.b64decode(doc["payload"]), doc["annotations"], doc["mimeType"])
    subject = _subject(manifest)
    result = await _key_verifier().verify(subject, _registry_for(subject.digest, [layer]), Limits())
    assert not result.ok
    assert "does not verify with the ECDSA" in result.reason


async def test_refuses_unsigned_image() -> None:
    manifest = (FIX / "dir-img-unsigned" / "manifest.json").read_bytes()
    result = await _key_verifier().verify(_subject(manifest), MemoryRegistry(), Limits())
    assert not result.ok
    assert "no signatures found" in result.reason


async def test_refuses_gpg_simple_signing_as_cosign() -> None:
    folder = FIX / "dir-img-valid"
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await _key_verifier().verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert not result.ok
    assert "no signature annotation" in result.reason


# ---- docker-reference policy --------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "repo", "reference", "ok"),
    [
        ("dir-img-cosign-valid", "cosign-signed-single-sample", "exact", True),
        ("dir-img-cosign-valid", "cosign-signed-single-sample", "repository", True),
        ("dir-img-cosign-valid", "this/does-not", "repository", False),
        ("dir-img-cosign-valid-with-tag", "skopeo-signed", "repository", True),
        # cosign writes no tag; pullgate's subject has none, so a tagged reference is
        # never an exact match (containers/image would accept it for ":tag" only).
        ("dir-img-cosign-valid-with-tag", "skopeo-signed", "exact", False),
        ("dir-img-cosign-valid-with-tag", "testing/manifest", "repository", False),
    ],
)
async def test_docker_reference_policy(case: str, repo: str, reference: str, ok: bool) -> None:
    folder = FIX / case
    manifest = (folder / "manifest.json").read_bytes()
    subject = _subject(manifest, repo=repo)
    result = await _key_verifier(reference=reference).verify(
        subject, _registry_for(subject.digest, _dir_layers(folder)), Limits()
    )
    assert result.ok is ok, result.reason
    if not ok:
        assert "docker-reference" in result.reason


# ---- Rekor (key + SET) ----------------------------------------------------------------


def _rekor_folder() -> Path:
    return FIX / "dir-img-cosign-key-rekor-valid"


async def test_key_rekor_vector_verifies_with_set(tmp_path: Path) -> None:
    root = _write_root(tmp_path, rekor_pem=FIX / "rekor.pub", ca_pems=[])
    verifier = cosign_verifier_from_spec(
        {"key": "cosign2.pub", "tlog": "required"},
        base_dir=FIX,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    manifest = (_rekor_folder() / "manifest.json").read_bytes()
    result = await verifier.verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-key-rekor-valid"), Limits()
    )
    assert result.ok, result.reason


def _rekor_layers(mutate: str) -> list[SignatureLayer]:
    layer = _dir_layers(_rekor_folder())[0]
    annotations = dict(layer.annotations)
    if mutate == "remove":
        del annotations["dev.sigstore.cosign/bundle"]
    elif mutate == "garble":
        bundle = json.loads(annotations["dev.sigstore.cosign/bundle"])
        bundle["Payload"]["integratedTime"] += 1
        annotations["dev.sigstore.cosign/bundle"] = json.dumps(bundle)
    elif mutate == "not-json":
        annotations["dev.sigstore.cosign/bundle"] = "{not json"
    return [SignatureLayer(layer.payload, annotations, layer.media_type)]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        ("remove", "no Rekor bundle"),
        ("garble", "SET signature does not verify"),
        ("not-json", "not valid JSON"),
    ],
)
async def test_refuses_key_rekor_vector_with_bad_set(tmp_path: Path, mutate: str, why: str) -> None:
    root = _write_root(tmp_path, rekor_pem=FIX / "rekor.pub", ca_pems=[])
    verifier = cosign_verifier_from_spec(
        {"key": "cosign2.pub", "tlog": "required"},
        base_dir=FIX,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    manifest = (_rekor_folder() / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await verifier.verify(
        subject, _registry_for(subject.digest, _rekor_layers(mutate)), Limits()
    )
    assert not result.ok
    assert why in result.reason


async def test_refuses_set_checked_with_wrong_rekor_key(tmp_path: Path) -> None:
    root = _write_root(tmp_path, rekor_pem=FIX / "cosign.pub", ca_pems=[])
    verifier = cosign_verifier_from_spec(
        {"key": "cosign2.pub", "tlog": "required"},
        base_dir=FIX,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    manifest = (_rekor_folder() / "manifest.json").read_bytes()
    result = await verifier.verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-key-rekor-valid"), Limits()
    )
    assert not result.ok
    assert "not in the trusted root" in result.reason


# ---- Fulcio + Rekor (keyless) ---------------------------------------------------------

FULCIO_SPEC = {
    "keyless": {"issuer": "https://github.com/login/oauth", "subject": "mitr@redhat.com"},
    "tlog": "required",
}


def _fulcio_verifier(root: Path, spec: dict[str, object] | None = None) -> CosignVerifier:
    verifier = cosign_verifier_from_spec(
        spec or FULCIO_SPEC, base_dir=FIX, trust=TrustConfig(sigstore_trusted_root=root)
    )
    assert isinstance(verifier, CosignVerifier)
    return verifier


async def test_fulcio_rekor_vector_verifies_at_integrated_time() -> None:
    manifest = (FIX / "dir-img-cosign-fulcio-rekor-valid" / "manifest.json").read_bytes()
    result = await _fulcio_verifier(PRD / "trusted_root.json").verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-fulcio-rekor-valid"), Limits()
    )
    assert result.ok, result.reason


def _fulcio_layers(drop: str | None) -> list[SignatureLayer]:
    layer = _dir_layers(FIX / "dir-img-cosign-fulcio-rekor-valid")[0]
    annotations = {k: v for k, v in layer.annotations.items() if k != drop}
    return [SignatureLayer(layer.payload, annotations, layer.media_type)]


@pytest.mark.parametrize(
    ("drop", "why"),
    [
        ("dev.sigstore.cosign/bundle", "no Rekor bundle"),
        ("dev.sigstore.cosign/certificate", "no certificate"),
    ],
)
async def test_refuses_fulcio_vector_without(drop: str, why: str) -> None:
    manifest = (FIX / "dir-img-cosign-fulcio-rekor-valid" / "manifest.json").read_bytes()
    subject = _subject(manifest)
    result = await _fulcio_verifier(PRD / "trusted_root.json").verify(
        subject, _registry_for(subject.digest, _fulcio_layers(drop)), Limits()
    )
    assert not result.ok
    assert why in result.reason


async def test_refuses_fulcio_vector_without_chain_when_only_root_trusted(tmp_path: Path) -> None:
    root = _write_root(tmp_path, rekor_pem=FIX / "rekor.pub", ca_pems=[FIX / "fulcio_v1.crt.pem"])
    manifest = (FIX / "dir-img-cosign-fulcio-rekor-valid" / "manifest.json").read_bytes()
    subject = _subject(manifest)
    verifier = _fulcio_verifier(root)
    with_chain = await verifier.verify(
        subject, _registry_for(subject.digest, _fulcio_layers(None)), Limits()
    )
    assert with_chain.ok, with_chain.reason
    without_chain = await verifier.verify(
        subject,
        _registry_for(subject.digest, _fulcio_layers("dev.sigstore.cosign/chain")),
        Limits(),
    )
    assert not without_chain.ok
    assert "does not chain to a trusted CA" in without_chain.reason


@pytest.mark.parametrize(
    ("keyless", "why"),
    [
        ({"issuer": "https://github.com/login/oauth", "subject": "other@redhat.com"}, "identity"),
        ({"issuer": "https://accounts.google.com", "subject": "mitr@redhat.com"}, "issuer"),
        ({"issuer": "https://github.com/login/oauth", "subject": "regexp:^someone@"}, "identity"),
    ],
)
async def test_refuses_fulcio_vector_for_other_identity(keyless: dict[str, str], why: str) -> None:
    manifest = (FIX / "dir-img-cosign-fulcio-rekor-valid" / "manifest.json").read_bytes()
    verifier = _fulcio_verifier(PRD / "trusted_root.json", {"keyless": keyless})
    result = await verifier.verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-fulcio-rekor-valid"), Limits()
    )
    assert not result.ok
    assert why in result.reason


async def test_fulcio_vector_regexp_identity_verifies() -> None:
    manifest = (FIX / "dir-img-cosign-fulcio-rekor-valid" / "manifest.json").read_bytes()
    spec = {
        "keyless": {"issuer": "regexp:^https://github\\.com/", "subject": "regexp:@redhat\\.com$"}
    }
    result = await _fulcio_verifier(PRD / "trusted_root.json", spec).verify(
        _subject(manifest), _registry_from_derived("dir-img-cosign-fulcio-rekor-valid"), Limits()
    )
    assert result.ok, result.reason


def test_standalone_fulcio_cert_valid_only_at_set_time() -> None:
    trust = load_trusted_root(PRD / "trusted_root.json")
    cert = load_certificates_pem((FIX / "fulcio-cert").read_bytes())[0]
    chain = load_certificates_pem((FIX / "fulcio-chain").read_bytes())
    at = dt.datetime(2022, 12, 12, 18, 48, 19, tzinfo=dt.UTC)
    verify_certificate_chain(trust, cert, chain, at=at)
    for bad in (
        dt.datetime(2022, 12, 12, 18, 48, 17, tzinfo=dt.UTC),
        dt.datetime(2022, 12, 12, 18, 58, 19, tzinfo=dt.UTC),
    ):
        with pytest.raises(SignatureError, match="does not chain"):
            verify_certificate_chain(trust, cert, chain, at=bad)


def test_standalone_rekor_set_verifies_and_binds() -> None:
    trust = load_trusted_root(PRD / "trusted_root.json")
    entry = parse_legacy_bundle((FIX / "rekor-set").read_text())
    verify_set(trust, entry)
    assert entry.integrated_time == 1670870899
    cert = load_certificates_pem((FIX / "fulcio-cert").read_bytes())[0]
    import hashlib

    from proxy.verify.keys import certificate_key

    payload = (FIX / "rekor-payload").read_bytes()
    signature = base64.b64decode((FIX / "rekor-sig").read_bytes())
    signer = SignerIdentity(certificate_key(cert), cert)
    check_hashedrekord_binding(
        entry, digest_hex=hashlib.sha256(payload).hexdigest(), signature=signature, signer=signer
    )
    with pytest.raises(SignatureError, match="another artifact hash"):
        check_hashedrekord_binding(
            entry, digest_hex=hashlib.sha256(b"x").hexdigest(), signature=signature, signer=signer
        )


def test_standalone_keyless_signature_verifies_against_payload_digest() -> None:
    trust = load_trusted_root(PRD / "trusted_root.json")
    verifier = CosignVerifier(
        label="cosign keyless test",
        policy=CosignPolicy(
            identity=KeylessIdentity(
                Matcher.parse("mitr@redhat.com", where="t"),
                Matcher.parse("https://github.com/login/oauth", where="t"),
            ),
            trust=trust,
            tlog_required=True,
        ),
    )
    payload = (FIX / "rekor-payload").read_bytes()
    annotations = {
        "dev.cosignproject.cosign/signature": (FIX / "rekor-sig").read_text(),
        "dev.sigstore.cosign/certificate": (FIX / "fulcio-cert").read_text(),
        "dev.sigstore.cosign/chain": (FIX / "fulcio-chain").read_text(),
        "dev.sigstore.cosign/bundle": (FIX / "rekor-set").read_text(),
    }
    digest = Digest.parse("sha256:fa93b01658e3a5a1686dc3ae55f170d8de487006fb53a28efcd12ab0710a2e5f")
    subject = Subject(
        "192.168.64.2:5000", "test-repo-2100826901021538654/alpine", digest, mt.DOCKER_MANIFEST, 0
    )
    verifier.verify_legacy_signature(LegacySignature(payload, annotations), subject)
    other = Subject(
        subject.registry, subject.repository, Digest.of(b"other"), mt.DOCKER_MANIFEST, 0
    )
    with pytest.raises(SignatureError, match="payload digest does not match"):
        verifier.verify_legacy_signature(LegacySignature(payload, annotations), other)


# ---- private PKI (RSA, no Rekor) -----------------------------------------------------


def _pki_verifier(root: Path) -> CosignVerifier:
    # The PKI leaf has no OIDC issuer extension: the issuer check is skipped here,
    # which a policy file cannot do (it must name an issuer).
    return CosignVerifier(
        label="cosign keyless pki",
        policy=CosignPolicy(
            identity=KeylessIdentity(Matcher.parse("qiwan@redhat.com", where="t"), None),
            trust=load_trusted_root(root),
        ),
    )


def _pki_layers(with_chain: bool) -> list[SignatureLayer]:
    layer = _dir_layers(FIX / "dir-img-cosign-pki-valid")[0]
    annotations = dict(layer.annotations)
    if not with_chain:
        annotations.pop("dev.sigstore.cosign/chain", None)
    return [SignatureLayer(layer.payload, annotations, layer.media_type)]


async def test_pki_vector_verifies_with_chain_annotation(tmp_path: Path) -> None:
    root = _write_root(tmp_path, rekor_pem=None, ca_pems=[FIX / "pki_root_crts.pem"])
    manifest = (FIX / "dir-img-cosign-pki-valid" / "manifest.json").read_bytes()
    subject = _subject(manifest, registry="localhost:5000", repo="test")
    result = await _pki_verifier(root).verify(
        subject, _registry_for(subject.digest, _pki_layers(True)), Limits()
    )
    assert result.ok, result.reason


async def test_pki_vector_without_chain_needs_trusted_intermediates(tmp_path: Path) -> None:
    manifest = (FIX / "dir-img-cosign-pki-valid" / "manifest.json").read_bytes()
    subject = _subject(manifest, registry="localhost:5000", repo="test")
    only_root = _write_root(tmp_path, rekor_pem=None, ca_pems=[FIX / "pki_root_crts.pem"])
    refused = await _pki_verifier(only_root).verify(
        subject, _registry_for(subject.digest, _pki_layers(False)), Limits()
    )
    assert not refused.ok
    assert "does not chain" in refused.reason
    both = tmp_path / "both"
    both.mkdir()
    with_intermediates = _write_root(
        both, rekor_pem=None, ca_pems=[FIX / "pki_intermediate_crts.pem", FIX / "pki_root_crts.pem"]
    )
    accepted = await _pki_verifier(with_intermediates).verify(
        subject, _registry_for(subject.digest, _pki_layers(False)), Limits()
    )
    assert accepted.ok, accepted.reason


def test_keyless_spec_requires_an_issuer() -> None:
    with pytest.raises(PolicyError, match="issuer"):
        cosign_verifier_from_spec(
            {"keyless": {"subject": "qiwan@redhat.com"}},
            base_dir=FIX,
            trust=TrustConfig(sigstore_trusted_root=PRD / "trusted_root.json"),
        )
