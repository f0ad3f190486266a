"""OMS model signing over OCI model artifacts, and the model-transparency vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor, parse_manifest
from proxy.verify.base import Limits, PolicyError, SignatureError, Subject, TrustConfig
from proxy.verify.keys import load_public_key_pem
from proxy.verify.oms import (
    PREDICATE_V1,
    check_files,
    oms_verifier_from_spec,
    parse_statement,
    verify_with_ca,
    verify_with_key,
)
from tests.support import cosign_sign as cs

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
TESTS = VECTORS / "model-transparency" / "scripts" / "tests"
PRD_ROOT = (
    VECTORS / "sigstore-python" / "sigstore" / "_store"
    / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json"
)  # fmt: skip
TITLE = "org.opencontainers.image.title"


def model_manifest(files: dict[str, bytes]) -> cs.Artifact:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": str(Digest.of(b"{}")),
            "size": 2,
        },
        "layers": [
            {
                "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                "digest": str(Digest.of(data)),
                "size": len(data),
                "annotations": {TITLE: name},
            }
            for name, data in files.items()
        ],
    }
    raw = json.dumps(doc).encode()
    return cs.Artifact(raw, doc["mediaType"], (b"{}", *files.values()))  # type: ignore[arg-type]


def oms_statement(
    files: dict[str, bytes], *, predicate_type: str = PREDICATE_V1, model: str = "model"
) -> bytes:
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    combined = hashlib.sha256(b"".join(bytes.fromhex(digests[n]) for n in sorted(digests)))
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": model, "digest": {"sha256": combined.hexdigest()}}],
        "predicateType": predicate_type,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256"},
            "resources": [
                {"name": n, "algorithm": "sha256", "digest": d} for n, d in sorted(digests.items())
            ],
        },
    }
    return json.dumps(statement).encode()


FILES = {"config.json": b'{"layers": 2}', "model.safetensors": b"weights" * 1000}


def setup(tmp_path: Path, files: dict[str, bytes], signed_files: dict[str, bytes], **kw: str):  # type: ignore[no-untyped-def]
    key = cs.generate_key("ecdsa-p384")
    key.write_public(tmp_path / "keys" / "model.pub")
    registry = cs.MemoryRegistry()
    model = model_manifest(files)
    registry.add(model)
    bundle = cs.dsse_bundle(key, oms_statement(signed_files, **kw))
    subject_descriptor = Descriptor(
        media_type=model.media_type, digest=model.digest, size=len(model.manifest)
    )
    registry.add(cs.bundle_referrer(bundle, subject_descriptor))
    verifier = oms_verifier_from_spec(
        {"key": "keys/model.pub"}, base_dir=tmp_path, trust=TrustConfig()
    )
    subject = Subject(
        registry="registry.example.test",
        repository="models/llm",
        digest=model.digest,
        media_type=model.media_type,
        size=len(model.manifest),
    )
    return registry, verifier, subject


async def test_signed_model_verifies_without_fetching_weights(tmp_path: Path) -> None:
    registry, verifier, subject = setup(tmp_path, FILES, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert result.ok, result.reason
    weights = Digest.of(FILES["model.safetensors"])
    assert weights not in registry.fetched_blobs


async def test_refuses_model_with_swapped_layer(tmp_path: Path) -> None:
    served = dict(FILES, **{"model.safetensors": b"poisoned weights"})
    registry, verifier, subject = setup(tmp_path, served, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "model.safetensors" in result.reason


async def test_refuses_model_with_extra_unsigned_layer(tmp_path: Path) -> None:
    served = dict(FILES, **{"backdoor.py": b"import os"})
    registry, verifier, subject = setup(tmp_path, served, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "not covered" in result.reason


async def test_refuses_model_missing_a_signed_layer(tmp_path: Path) -> None:
    served = {"config.json": FILES["config.json"]}
    registry, verifier, subject = setup(tmp_path, served, FILES)
    assert not (await verifier.verify(subject, registry, Limits())).ok


async def test_refuses_wrong_predicate_type(tmp_path: Path) -> None:
    registry, verifier, subject = setup(
        tmp_path, FILES, FILES, predicate_type="https://slsa.dev/provenance/v1"
    )
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "not OMS" in result.reason


async def test_refuses_model_signed_with_another_key(tmp_path: Path) -> None:
    registry, _, subject = setup(tmp_path, FILES, FILES)
    cs.generate_key("ecdsa-p384").write_public(tmp_path / "keys" / "model.pub")
    other = oms_verifier_from_spec(
        {"key": "keys/model.pub"}, base_dir=tmp_path, trust=TrustConfig()
    )
    assert not (await other.verify(subject, registry, Limits())).ok


async def test_refuses_unsigned_model_and_oversize_bundle(tmp_path: Path) -> None:
    registry, verifier, subject = setup(tmp_path, FILES, FILES)
    assert not (await verifier.verify(subject, registry, Limits(max_bundle_bytes=10))).ok
    empty = cs.MemoryRegistry()
    model = model_manifest(FILES)
    empty.add(model)
    result = await verifier.verify(subject, empty, Limits())
    assert not result.ok and "no model signatures" in result.reason


def test_refuses_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        oms_verifier_from_spec({}, base_dir=tmp_path, trust=TrustConfig())
    with pytest.raises(PolicyError):
        oms_verifier_from_spec({"key": "missing.pub"}, base_dir=tmp_path, trust=TrustConfig())
    with pytest.raises(PolicyError):
        oms_verifier_from_spec(
            {"sigstore": {"issuer": "i", "subject": "s"}}, base_dir=tmp_path, trust=TrustConfig()
        )


# ---- model-transparency vectors --------------------------------------------------------


def _tests_dir() -> Path:
    if not TESTS.is_dir():
        pytest.skip(f"signature vectors not found at {TESTS}")
    return TESTS


def _folder_files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.is_file() and p.name != "model.sig"
    }


KEY_CASES = ["v1.0.1-elliptic-key", "v1.1.0-elliptic-key"]
SINGLE_FILE_KEY_CASES = ["v0.3.1-elliptic-key", "v1.0.0-elliptic-key"]
CERT_CASES = [
    "v0.2.0-certificate",
    "v0.3.1-certificate",
    "v1.0.0-certificate",
    "v1.0.1-certificate",
    "v1.1.0-certificate",
]
SIGSTORE_CASES = ["v0.3.1-sigstore", "v1.0.0-sigstore", "v1.0.1-sigstore", "v1.1.0-sigstore"]


def _key() -> object:
    return load_public_key_pem(
        (_tests_dir() / "keys" / "certificate" / "signing-key-pub.pem").read_bytes()
    )


@pytest.mark.parametrize("case", KEY_CASES)
def test_vector_key_signed_models_verify(case: str) -> None:
    folder = _tests_dir() / case
    signature = parse_statement(verify_with_key((folder / "model.sig").read_bytes(), _key()))  # type: ignore[arg-type]
    check_files(signature, _folder_files(folder), ("ignore-me",))


@pytest.mark.parametrize("case", SINGLE_FILE_KEY_CASES)
def test_vector_single_file_models_verify_only_as_a_single_file(case: str) -> None:
    folder = _tests_dir() / case
    signature = parse_statement(verify_with_key((folder / "model.sig").read_bytes(), _key()))  # type: ignore[arg-type]
    single = {".": hashlib.sha256((folder / "signme-1").read_bytes()).hexdigest()}
    check_files(signature, single, ())
    with pytest.raises(SignatureError):
        check_files(signature, _folder_files(folder), ())


@pytest.mark.parametrize("case", CERT_CASES)
def test_vector_certificate_signed_models_verify(case: str) -> None:
    from cryptography import x509

    folder = _tests_dir() / case
    roots = x509.load_pem_x509_certificates(
        (_tests_dir() / "keys" / "certificate" / "ca-cert.pem").read_bytes()
    )
    signature = parse_statement(verify_with_ca((folder / "model.sig").read_bytes(), roots))
    check_files(signature, _folder_files(folder), ("ignore-me",))


def test_vector_key_signature_refused_against_another_models_files() -> None:
    tests = _tests_dir()
    signature = parse_statement(
        verify_with_key((tests / "v1.1.0-elliptic-key" / "model.sig").read_bytes(), _key())  # type: ignore[arg-type]
    )
    with pytest.raises(SignatureError, match="signme-1"):
        check_files(signature, _folder_files(tests / "v1.1.0-certificate"), ("ignore-me",))


def test_vector_certificate_bundle_refused_by_key_method() -> None:
    raw = (_tests_dir() / "v1.1.0-certificate" / "model.sig").read_bytes()
    with pytest.raises(SignatureError, match="no public-key material"):
        verify_with_key(raw, _key())  # type: ignore[arg-type]


@pytest.mark.parametrize("case", SIGSTORE_CASES)
def test_vector_sigstore_signed_models_verify_offline(case: str) -> None:
    folder = _tests_dir() / case
    good = oms_verifier_from_spec(
        {
            "sigstore": {
                "issuer": "https://sigstore.verify.ibm.com/oauth2",
                "subject": "stefanb@us.ibm.com",
            }
        },
        base_dir=Path("/"),
        trust=TrustConfig(sigstore_trusted_root=PRD_ROOT),
    )
    signature = parse_statement(good._check((folder / "model.sig").read_bytes()))
    check_files(signature, _folder_files(folder), ("ignore-me",))
    other = oms_verifier_from_spec(
        {
            "sigstore": {
                "issuer": "https://sigstore.verify.ibm.com/oauth2",
                "subject": "eve@example.com",
            }
        },
        base_dir=Path("/"),
        trust=TrustConfig(sigstore_trusted_root=PRD_ROOT),
    )
    with pytest.raises(SignatureError):
        other._check((folder / "model.sig").read_bytes())


def test_model_manifest_parses_with_titles() -> None:
    model = model_manifest(FILES)
    parsed = parse_manifest(model.manifest, model.media_type)
    assert [layer.annotations[TITLE] for layer in parsed.layers] == list(FILES)


# ---- signatures made by model_signing itself -------------------------------------------


def _write_private_key(path: Path, key: object) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for name, data in FILES.items():
        (model / name).write_bytes(data)
    return model


def _gate_case(tmp_path: Path, signature: bytes, spec: dict[str, object], served: dict[str, bytes]):  # type: ignore[no-untyped-def]
    registry = cs.MemoryRegistry()
    model = model_manifest(served)
    registry.add(model)
    descriptor = Descriptor(
        media_type=model.media_type, digest=model.digest, size=len(model.manifest)
    )
    registry.add(cs.bundle_referrer(signature, descriptor))
    verifier = oms_verifier_from_spec(spec, base_dir=tmp_path, trust=TrustConfig())
    subject = Subject(
        registry="registry.example.test",
        repository="models/llm",
        digest=model.digest,
        media_type=model.media_type,
        size=len(model.manifest),
    )
    return verifier, subject, registry


async def test_model_signing_key_signature_verifies_at_the_gate(tmp_path: Path) -> None:
    import model_signing
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = _write_private_key(tmp_path / "signing.key", key)
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "signing.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(
        _model_dir(tmp_path), tmp_path / "model.sig"
    )
    signature = (tmp_path / "model.sig").read_bytes()
    verifier, subject, registry = _gate_case(tmp_path, signature, {"key": "signing.pub"}, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert result.ok, result.reason
    poisoned = dict(FILES, **{"model.safetensors": b"poisoned"})
    verifier, subject, registry = _gate_case(tmp_path, signature, {"key": "signing.pub"}, poisoned)
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "model.safetensors" in result.reason


async def test_model_signing_certificate_signature_verifies_at_the_gate(tmp_path: Path) -> None:
    import model_signing

    from tests.support.pki_sign import CODE_SIGNING, issue

    root = issue("model root", ca=True, key_usage="ca")
    intermediate = issue("model intermediate", issuer=root, ca=True, key_usage="ca")
    leaf = issue("model signer", issuer=intermediate, key_usage="sign", eku=[CODE_SIGNING])
    (tmp_path / "signer.pem").write_bytes(leaf.pem)
    (tmp_path / "chain.pem").write_bytes(intermediate.pem)
    (tmp_path / "ca.pem").write_bytes(root.pem)
    model_signing.signing.Config().use_certificate_signer(
        private_key=_write_private_key(tmp_path / "signer.key", leaf.key),
        signing_certificate=tmp_path / "signer.pem",
        certificate_chain=[tmp_path / "chain.pem"],
    ).sign(_model_dir(tmp_path), tmp_path / "model.sig")
    signature = (tmp_path / "model.sig").read_bytes()
    spec = {"certificate": {"caFile": "ca.pem"}}
    verifier, subject, registry = _gate_case(tmp_path, signature, spec, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert result.ok, result.reason
    (tmp_path / "ca.pem").write_bytes(issue("other root", ca=True, key_usage="ca").pem)
    verifier, subject, registry = _gate_case(tmp_path, signature, spec, FILES)
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "does not chain to the configured CA" in result.reason


def test_refuses_key_bundle_whose_hint_names_another_key() -> None:
    key, other = cs.generate_key("ecdsa-p384"), cs.generate_key("ecdsa-p384")
    bundle = json.loads(cs.dsse_bundle(key, oms_statement(FILES)))
    bundle["verificationMaterial"]["publicKey"]["hint"] = hashlib.sha256(
        other.public_pem
    ).hexdigest()
    with pytest.raises(SignatureError, match="Key mismatch"):
        verify_with_key(json.dumps(bundle).encode(), load_public_key_pem(key.public_pem))


def test_refuses_statement_listing_a_file_twice() -> None:
    statement = json.loads(oms_statement(FILES))
    resources = statement["predicate"]["resources"]
    resources.append({**resources[0], "digest": hashlib.sha256(b"other").hexdigest()})
    combined = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources))
    statement["subject"][0]["digest"]["sha256"] = combined.hexdigest()
    with pytest.raises(SignatureError, match="twice"):
        parse_statement(json.dumps(statement).encode())


def test_refuses_statement_whose_subject_does_not_match_its_resources() -> None:
    statement = json.loads(oms_statement(FILES))
    statement["subject"][0]["digest"]["sha256"] = "00" * 32
    with pytest.raises(SignatureError, match="inconsistent"):
        parse_statement(json.dumps(statement).encode())


def test_refuses_shard_serialization() -> None:
    statement = json.loads(oms_statement(FILES))
    statement["predicate"]["serialization"] = {
        "method": "shards",
        "hash_type": "sha256",
        "shard_size": 1024,
        "allow_symlinks": False,
    }
    for resource in statement["predicate"]["resources"]:
        resource["name"] += ":0:1024"
    with pytest.raises(SignatureError, match="not by files"):
        parse_statement(json.dumps(statement).encode())
