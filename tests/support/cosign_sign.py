"""A test signer for cosign and sigstore formats, plus an in-memory registry.

Everything is generated with ``cryptography``; nothing touches the network.

Keys
    ``generate_key(kind)`` → ``TestKey`` (``kind``: ``ecdsa-p256`` (default),
    ``ecdsa-p384``, ``rsa``, ``rsa-pss``, ``ed25519``). ``key.public_pem``,
    ``key.write_public(path)``, ``key.sign(data)``.

Legacy cosign signatures (tag ``sha256-<hex>.sig``)
    ``simple_signing_payload(digest, docker_reference)`` → payload bytes.
    ``sign_layer(key, payload)`` → ``SignatureLayer`` (payload + annotations).
    ``TestSigstore.sign_layer_keyless(...)`` adds certificate, chain and Rekor SET.
    ``signature_image(subject_digest, layers)`` → ``Artifact`` (tag, manifest, blobs).

Sigstore bundles as referrers
    ``message_signature_bundle(key, manifest_digest, ...)`` and
    ``dsse_bundle(key, statement, ...)`` → bundle JSON bytes (public-key bundles);
    ``TestSigstore.certificate_bundle(...)`` → a v0.3 certificate bundle with a
    hashedrekord/dsse tlog entry, SET, inclusion proof and signed checkpoint, and an
    embedded SCT, which sigstore-python accepts offline against
    ``TestSigstore.trusted_root()``.
    ``in_toto_statement(digest, predicate_type)`` builds a statement (an attestation);
    ``sign_statement(digest)`` the one ``cosign sign --new-bundle-format`` signs.
    ``bundle_referrer(bundle, subject_descriptor)`` → ``Artifact`` (no tag).
    ``document_referrer(document, subject_descriptor, artifact_type)`` → an ORAS-style
    referrer (an SBOM: ``spdx_document(name)``), signed like any manifest.

Test "Fulcio" and "Rekor"
    ``TestSigstore()`` holds a root + intermediate CA, a Rekor key and a CT log key.
    ``issue_certificate(key, identity=..., issuer=..., not_before=..., lifetime=...)``
    makes a leaf with SAN, OIDC issuer extensions (1.3.6.1.4.1.57264.1.1 and .1.8),
    code-signing EKU and an SCT. ``rekor_entry(...)``, ``legacy_rekor_bundle(...)``
    make SETs. ``trusted_root()`` / ``write_trusted_root(path)`` give the
    ``trusted_root.json`` containing all of it.

Pushing
    ``await push_artifact(artifact, push_blob=..., push_manifest=...)`` calls
    ``push_blob(data)`` and ``push_manifest(reference, data, media_type)``; either may be
    sync or async (e.g. ``tests/support/ocilayout`` helpers, or ``MemoryRegistry``).
    ``push_to_registry(url, repository, artifact)`` uses the distribution HTTP API
    (blocking, for a local test registry); ``push_referrer(...)`` also publishes the
    referrers fallback index.

In-memory registry
    ``MemoryRegistry`` implements ``proxy.pipeline.gate.ArtifactSource`` and records fetches.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import inspect
import json
import struct
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import ManifestTooLarge, Unsupported
from proxy.oci.manifest import Descriptor, Manifest, build_index, parse_manifest

UTC = dt.UTC
SIMPLESIGNING = mt.COSIGN_SIMPLESIGNING
BUNDLE_TYPE = mt.SIGSTORE_BUNDLE_V03
EMPTY_CONFIG = b"{}"
OID_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_SCT_LIST = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem_b64(pem: bytes) -> str:
    return _b64(pem)


# ---- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class TestKey:
    """A private key and how cosign would sign with it."""

    __test__ = False
    private: Any
    kind: str

    @property
    def public(self) -> Any:
        return self.private.public_key()

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    @property
    def spki_der(self) -> bytes:
        return bytes(
            self.public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def write_public(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.public_pem)
        return path

    def sign(self, data: bytes) -> bytes:
        if self.kind == "ed25519":
            return bytes(self.private.sign(data))
        if self.kind == "rsa":
            return bytes(self.private.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        if self.kind == "rsa-pss":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return bytes(self.private.sign(data, pss, hashes.SHA256()))
        algorithm = hashes.SHA384() if self.kind == "ecdsa-p384" else hashes.SHA256()
        return bytes(self.private.sign(data, ec.ECDSA(algorithm)))


def generate_key(kind: str = "ecdsa-p256") -> TestKey:
    if kind == "ecdsa-p256":
        return TestKey(ec.generate_private_key(ec.SECP256R1()), kind)
    if kind == "ecdsa-p384":
        return TestKey(ec.generate_private_key(ec.SECP384R1()), kind)
    if kind in ("rsa", "rsa-pss"):
        return TestKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), kind)
    if kind == "ed25519":
        return TestKey(ed25519.Ed25519PrivateKey.generate(), kind)
    raise ValueError(f"unknown key kind {kind}")


# ---- artifacts and pushing ----------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A manifest plus the blobs it needs; ``tag`` None for referrers (push by digest)."""

    manifest: bytes
    media_type: str
    blobs: tuple[bytes, ...]
    tag: str | None = None

    @property
    def digest(self) -> Digest:
        return Digest.of(self.manifest)

    @property
    def descriptor(self) -> Descriptor:
        doc = json.loads(self.manifest)
        return Descriptor(
            media_type=self.media_type,
            digest=self.digest,
            size=len(self.manifest),
            artifact_type=doc.get("artifactType"),
        )


def _descriptor_json(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mediaType": media_type,
        "digest": str(Digest.of(data)),
        "size": len(data),
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _manifest_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def image_manifest(layers: list[bytes], *, config: bytes = b'{"architecture":"amd64"}') -> Artifact:
    """A small OCI image (for tests that need a subject manifest with blobs)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": _descriptor_json("application/vnd.oci.image.config.v1+json", config),
        "layers": [
            _descriptor_json("application/vnd.oci.image.layer.v1.tar", layer) for layer in layers
        ],
    }
    return Artifact(_manifest_bytes(doc), mt.OCI_MANIFEST, (config, *layers))


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def push_artifact(
    artifact: Artifact,
    *,
    push_blob: Callable[[bytes], Any],
    push_manifest: Callable[[str, bytes, str], Any],
) -> Digest:
    """Push the blobs, then the manifest by tag (or by digest when it has no tag)."""
    for blob in artifact.blobs:
        await _maybe_await(push_blob(blob))
    reference = artifact.tag or str(artifact.digest)
    await _maybe_await(push_manifest(reference, artifact.manifest, artifact.media_type))
    return artifact.digest


def push_to_registry(url: str, repository: str, artifact: Artifact) -> Digest:
    """Push over the distribution API (monolithic uploads) to a local test registry."""
    base = url.rstrip("/")
    for blob in artifact.blobs:
        digest = Digest.of(blob)
        start = urllib.request.Request(f"{base}/v2/{repository}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=30) as response:
            location = response.headers["Location"]
        if location.startswith("/"):
            location = base + location
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            data=blob,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(put, timeout=30).close()
    reference = artifact.tag or str(artifact.digest)
    put = urllib.request.Request(
        f"{base}/v2/{repository}/manifests/{reference}",
        data=artifact.manifest,
        method="PUT",
        headers={"Content-Type": artifact.media_type},
    )
    urllib.request.urlopen(put, timeout=30).close()
    return artifact.digest


def push_referrer(
    url: str, repository: str, subject: Digest | str, artifact: Artifact, artifact_type: str
) -> None:
    """Push a referrer, then the OCI referrers fallback index at tag ``sha256-<hex>`` of
    ``subject`` (docker-registry has no referrers API). One referrer per subject."""
    push_to_registry(url, repository, artifact)
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": artifact.media_type,
                "digest": str(artifact.digest),
                "size": len(artifact.manifest),
                "artifactType": artifact_type,
            }
        ],
    }
    fallback = Digest.parse(str(subject)).fallback_tag
    push_to_registry(url, repository, Artifact(_manifest_bytes(index), mt.OCI_INDEX, (), fallback))


# ---- legacy simple signing ---------------------------------------------------------


@dataclass(frozen=True)
class SignatureLayer:
    payload: bytes
    annotations: dict[str, str]
    media_type: str = SIMPLESIGNING


def simple_signing_payload(
    digest: Digest | str,
    docker_reference: str = "registry.test/app",
    *,
    signature_type: str = "cosign container image signature",
    optional: Mapping[str, Any] | None = None,
) -> bytes:
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": str(digest)},
            "type": signature_type,
        },
        "optional": dict(optional) if optional is not None else None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign_layer(key: TestKey, payload: bytes) -> SignatureLayer:
    return SignatureLayer(payload, {"dev.cosignproject.cosign/signature": _b64(key.sign(payload))})


def signature_image(subject_digest: Digest, layers: list[SignatureLayer]) -> Artifact:
    """cosign's signature image: tag ``sha256-<hex>.sig``, one layer per signature."""
    config = json.dumps(
        {"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}},
        separators=(",", ":"),
    ).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": _descriptor_json("application/vnd.oci.image.config.v1+json", config),
        "layers": [
            _descriptor_json(layer.media_type, layer.payload, annotations=layer.annotations)
            for layer in layers
        ],
    }
    payloads = list(dict.fromkeys(layer.payload for layer in layers))
    return Artifact(
        _manifest_bytes(doc),
        mt.OCI_MANIFEST,
        (config, *payloads),
        tag=f"{subject_digest.fallback_tag}.sig",
    )


# ---- bundles -----------------------------------------------------------------------


def in_toto_statement(
    digest: Digest,
    predicate_type: str = "https://cosign.sigstore.dev/attestation/v1",
    *,
    name: str = "registry.test/app",
) -> bytes:
    doc = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": name, "digest": {digest.algorithm: digest.hex}}],
        "predicateType": predicate_type,
        "predicate": {"Data": "test"},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"


def sign_statement(digest: Digest) -> bytes:
    """The statement ``cosign sign --new-bundle-format`` signs (cosign 2.6+): in-toto v1,
    the image digest as the only subject (no name), cosign's sign predicate type and an
    empty predicate (3.0.5+; earlier versions wrote none)."""
    doc = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {digest.algorithm: digest.hex}}],
        "predicateType": COSIGN_SIGN_PREDICATE,
        "predicate": {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def _hint(key: TestKey) -> str:
    return hashlib.sha256(key.public_pem).hexdigest()


def message_signature_bundle(
    key: TestKey,
    manifest_digest: Digest,
    *,
    signature: bytes | None = None,
    manifest: bytes | None = None,
    tlog_entries: list[dict[str, Any]] | None = None,
    message_digest: bytes | None = None,
) -> bytes:
    """A public-key v0.3 bundle whose messageSignature signs the manifest.

    ECDSA/RSA sign the manifest digest prehashed; Ed25519 needs ``manifest`` bytes.
    """
    if signature is None:
        signature = _sign_digest(key, manifest_digest, manifest)
    doc = {
        "mediaType": BUNDLE_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": _hint(key)},
            "tlogEntries": tlog_entries or [],
        },
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": _b64(message_digest or bytes.fromhex(manifest_digest.hex)),
            },
            "signature": _b64(signature),
        },
    }
    return json.dumps(doc).encode()


def _sign_digest(key: TestKey, digest: Digest, manifest: bytes | None) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if key.kind == "ed25519":
        if manifest is None:
            raise ValueError("Ed25519 needs the manifest bytes")
        return key.sign(manifest)
    raw = bytes.fromhex(digest.hex)
    if key.kind == "rsa":
        return bytes(key.private.sign(raw, padding.PKCS1v15(), Prehashed(hashes.SHA256())))
    if key.kind == "rsa-pss":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return bytes(key.private.sign(raw, pss, Prehashed(hashes.SHA256())))
    return bytes(key.private.sign(raw, ec.ECDSA(Prehashed(hashes.SHA256()))))


def dsse_envelope(
    key: TestKey, statement: bytes, payload_type: str = "application/vnd.in-toto+json"
) -> dict[str, Any]:
    return {
        "payload": _b64(statement),
        "payloadType": payload_type,
        "signatures": [{"sig": _b64(key.sign(pae(payload_type, statement))), "keyid": ""}],
    }


def dsse_bundle(
    key: TestKey,
    statement: bytes,
    *,
    payload_type: str = "application/vnd.in-toto+json",
    tlog_entries: list[dict[str, Any]] | None = None,
    envelope: dict[str, Any] | None = None,
) -> bytes:
    doc = {
        "mediaType": BUNDLE_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": _hint(key)},
            "tlogEntries": tlog_entries or [],
        },
        "dsseEnvelope": envelope or dsse_envelope(key, statement, payload_type),
    }
    return json.dumps(doc).encode()


def bundle_referrer(
    bundle: bytes,
    subject: Descriptor,
    *,
    predicate_type: str | None = None,
    layer_media_type: str = BUNDLE_TYPE,
) -> Artifact:
    """cosign's referrer for a bundle: empty config, one bundle layer, ``subject`` set."""
    annotations: dict[str, str] = {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}
    if predicate_type:
        annotations["dev.sigstore.bundle.content"] = "dsse-envelope"
        annotations["dev.sigstore.bundle.predicateType"] = predicate_type
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": BUNDLE_TYPE,
        "config": _descriptor_json(mt.OCI_EMPTY, EMPTY_CONFIG),
        "layers": [_descriptor_json(layer_media_type, bundle)],
        "subject": {
            "mediaType": subject.media_type,
            "digest": str(subject.digest),
            "size": subject.size,
        },
        "annotations": annotations,
    }
    return Artifact(_manifest_bytes(doc), mt.OCI_MANIFEST, (EMPTY_CONFIG, bundle))


def document_referrer(document: bytes, subject: Descriptor, artifact_type: str) -> Artifact:
    """An ORAS-style referrer carrying one document (an SPDX SBOM, say) about ``subject``:
    ``artifactType`` set, empty config, one layer of that media type."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": _descriptor_json(mt.OCI_EMPTY, EMPTY_CONFIG),
        "layers": [_descriptor_json(artifact_type, document)],
        "subject": {
            "mediaType": subject.media_type,
            "digest": str(subject.digest),
            "size": subject.size,
        },
    }
    return Artifact(_manifest_bytes(doc), mt.OCI_MANIFEST, (EMPTY_CONFIG, document))


def spdx_document(name: str) -> bytes:
    """A minimal SPDX 2.3 JSON document (content is opaque to pullgate)."""
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"https://example.test/spdx/{name}",
        "creationInfo": {"created": "2026-01-01T00:00:00Z", "creators": ["Tool: tests"]},
        "packages": [],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# ---- Merkle tree (RFC 6962) ---------------------------------------------------------


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _mth(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return _leaf(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def _audit_path(index: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if index < k:
        return [*_audit_path(index, leaves[:k]), _mth(leaves[k:])]
    return [*_audit_path(index - k, leaves[k:]), _mth(leaves[:k])]


# ---- the test sigstore (Fulcio CA, Rekor, CT) ----------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pullgate-test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < 128:
        return bytes([0x0C, len(raw)]) + raw
    size = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return bytes([0x0C, 0x80 | len(size)]) + size + raw


def _der_octet_string(raw: bytes) -> bytes:
    if len(raw) < 128:
        return bytes([0x04, len(raw)]) + raw
    size = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(size)]) + size + raw


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class TestSigstore:
    """A self-contained Fulcio CA, Rekor log and CT log for offline tests."""

    __test__ = False
    epoch: dt.datetime = field(default_factory=lambda: dt.datetime(2024, 1, 1, tzinfo=UTC))
    root_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    intermediate_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    rekor: TestKey = field(default_factory=generate_key)
    ct: TestKey = field(default_factory=generate_key)
    origin: str = "rekor.pullgate.test - 1"
    _log_index: int = 1000

    def __post_init__(self) -> None:
        start = self.epoch - dt.timedelta(days=1)
        end = self.epoch + dt.timedelta(days=365 * 30)
        ski_root = x509.SubjectKeyIdentifier.from_public_key(self.root_key.public_key())
        self.root_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("test-sigstore"))
            .issuer_name(_name("test-sigstore"))
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(ski_root, critical=False)
            .sign(self.root_key, hashes.SHA384())
        )
        self.intermediate_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("test-sigstore-intermediate"))
            .issuer_name(self.root_cert.subject)
            .public_key(self.intermediate_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.intermediate_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski_root),
                critical=False,
            )
            .sign(self.root_key, hashes.SHA384())
        )

    @property
    def log_id(self) -> bytes:
        return hashlib.sha256(self.rekor.spki_der).digest()

    @property
    def chain_pem(self) -> str:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (self.intermediate_cert, self.root_cert)
        ).decode()

    # -- certificates --

    def issue_certificate(
        self,
        key: TestKey,
        *,
        identity: str = "signer@example.test",
        issuer: str | None = "https://issuer.example.test",
        not_before: dt.datetime | None = None,
        lifetime: dt.timedelta = dt.timedelta(minutes=10),
        code_signing: bool = True,
        sct: bool = True,
    ) -> x509.Certificate:
        """A Fulcio-like leaf; ``identity`` is an email, or a URI when it has ``://``."""
        start = not_before or self.epoch
        san: x509.GeneralName = (
            x509.UniformResourceIdentifier(identity)
            if "://" in identity
            else x509.RFC822Name(identity)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(key.public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        ExtendedKeyUsageOID.CODE_SIGNING
                        if code_signing
                        else ExtendedKeyUsageOID.SERVER_AUTH
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(OID_ISSUER_V1, issuer.encode()), critical=False
            ).add_extension(
                x509.UnrecognizedExtension(OID_ISSUER_V2, _der_utf8(issuer)), critical=False
            )
        if not sct:
            return builder.sign(self.intermediate_key, hashes.SHA384())
        # The SCT signs the precertificate TBS: the same certificate without the SCT
        # extension. Building that first, then adding the SCT list as the last extension,
        # makes cryptography's tbs_precertificate_bytes equal to the signed TBS.
        precert = builder.sign(self.intermediate_key, hashes.SHA384())
        sct_list = self._sct_list(precert, start)
        return builder.add_extension(
            x509.UnrecognizedExtension(OID_SCT_LIST, _der_octet_string(sct_list)),
            critical=False,
        ).sign(self.intermediate_key, hashes.SHA384())

    def _sct_list(self, precert: x509.Certificate, when: dt.datetime) -> bytes:
        tbs = precert.tbs_certificate_bytes
        issuer_key_hash = hashlib.sha256(
            self.intermediate_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
        timestamp = int(when.timestamp()) * 1000
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp, 1)
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + struct.pack("!H", 0)
        )
        signature = self.ct.sign(signed)
        ct_log_id = hashlib.sha256(self.ct.spki_der).digest()
        sct = (
            struct.pack("!B", 0)
            + ct_log_id
            + struct.pack("!QH", timestamp, 0)
            + struct.pack("!BBH", 4, 3, len(signature))
            + signature
        )
        serialized = struct.pack("!H", len(sct)) + sct
        return struct.pack("!H", len(serialized)) + serialized

    # -- Rekor --

    def _next_index(self) -> int:
        self._log_index += 1
        return self._log_index

    def hashedrekord_body(self, *, digest_hex: str, signature: bytes, signer_pem: bytes) -> bytes:
        doc = {
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": digest_hex}},
                "signature": {
                    "content": _b64(signature),
                    "publicKey": {"content": _pem_b64(signer_pem)},
                },
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def dsse_body(self, *, envelope: dict[str, Any], signer_pem: bytes) -> bytes:
        payload = base64.b64decode(envelope["payload"])
        doc = {
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "envelopeHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(json.dumps(envelope).encode()).hexdigest(),
                },
                "payloadHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(payload).hexdigest(),
                },
                "signatures": [
                    {"signature": s["sig"], "verifier": _pem_b64(signer_pem)}
                    for s in envelope["signatures"]
                ],
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def set_signature(self, body: bytes, integrated_time: int, log_index: int) -> bytes:
        payload = json.dumps(
            {
                "body": _b64(body),
                "integratedTime": integrated_time,
                "logID": self.log_id.hex(),
                "logIndex": log_index,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        return self.rekor.sign(payload)

    def legacy_rekor_bundle(self, body: bytes, *, integrated_time: int | None = None) -> str:
        """The ``dev.sigstore.cosign/bundle`` annotation for ``body``."""
        when = integrated_time if integrated_time is not None else int(self.epoch.timestamp()) + 1
        index = self._next_index()
        return json.dumps(
            {
                "SignedEntryTimestamp": _b64(self.set_signature(body, when, index)),
                "Payload": {
                    "body": _b64(body),
                    "integratedTime": when,
                    "logIndex": index,
                    "logID": self.log_id.hex(),
                },
            }
        )

    def checkpoint(self, tree_size: int, root: bytes) -> str:
        note = f"{self.origin}\n{tree_size}\n{_b64(root)}\n"
        signature = self.rekor.sign(note.encode())
        return f"{note}\n\u2014 rekor.pullgate.test {_b64(self.log_id[:4] + signature)}\n"

    def tlog_entry(
        self,
        body: bytes,
        *,
        kind: str,
        integrated_time: int | None = None,
        with_set: bool = True,
        with_proof: bool = True,
    ) -> dict[str, Any]:
        """A bundle ``tlogEntries`` item: SET plus an inclusion proof in a 5-leaf tree."""
        when = integrated_time if integrated_time is not None else int(self.epoch.timestamp()) + 1
        index = self._next_index()
        leaves = [b"filler-0", b"filler-1", b"filler-2", body, b"filler-4"]
        position = 3
        entry: dict[str, Any] = {
            "logIndex": str(index),
            "logId": {"keyId": _b64(self.log_id)},
            "kindVersion": {"kind": kind, "version": "0.0.1"},
            "integratedTime": str(when),
            "canonicalizedBody": _b64(body),
        }
        if with_set:
            entry["inclusionPromise"] = {
                "signedEntryTimestamp": _b64(self.set_signature(body, when, index))
            }
        if with_proof:
            root = _mth(leaves)
            entry["inclusionProof"] = {
                "logIndex": str(position),
                "rootHash": _b64(root),
                "treeSize": str(len(leaves)),
                "hashes": [_b64(h) for h in _audit_path(position, leaves)],
                "checkpoint": {"envelope": self.checkpoint(len(leaves), root)},
            }
        return entry

    # -- signatures --

    def sign_layer_keyless(
        self,
        key: TestKey,
        payload: bytes,
        *,
        certificate: x509.Certificate | None = None,
        with_chain: bool = True,
        with_set: bool = True,
        integrated_time: int | None = None,
        **cert_options: Any,
    ) -> SignatureLayer:
        """A legacy layer signed by a Fulcio-like certificate and logged in the test Rekor."""
        cert = certificate or self.issue_certificate(key, **cert_options)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        signature = key.sign(payload)
        annotations = {
            "dev.cosignproject.cosign/signature": _b64(signature),
            "dev.sigstore.cosign/certificate": cert_pem.decode(),
        }
        if with_chain:
            annotations["dev.sigstore.cosign/chain"] = self.chain_pem
        if with_set:
            body = self.hashedrekord_body(
                digest_hex=hashlib.sha256(payload).hexdigest(),
                signature=signature,
                signer_pem=cert_pem,
            )
            when = integrated_time
            if when is None:
                when = int(cert.not_valid_before_utc.timestamp()) + 1
            annotations["dev.sigstore.cosign/bundle"] = self.legacy_rekor_bundle(
                body, integrated_time=when
            )
        return SignatureLayer(payload, annotations)

    def certificate_bundle(
        self,
        key: TestKey,
        manifest_digest: Digest,
        *,
        statement: bytes | None = None,
        certificate: x509.Certificate | None = None,
        **cert_options: Any,
    ) -> bytes:
        """A v0.3 certificate bundle (messageSignature, or DSSE when ``statement``)."""
        cert = certificate or self.issue_certificate(key, **cert_options)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        when = int(cert.not_valid_before_utc.timestamp()) + 1
        doc: dict[str, Any] = {"mediaType": BUNDLE_TYPE}
        if statement is None:
            signature = _sign_digest(key, manifest_digest, None)
            body = self.hashedrekord_body(
                digest_hex=manifest_digest.hex, signature=signature, signer_pem=cert_pem
            )
            entry = self.tlog_entry(body, kind="hashedrekord", integrated_time=when)
            doc["messageSignature"] = {
                "messageDigest": {
                    "algorithm": "SHA2_256",
                    "digest": _b64(bytes.fromhex(manifest_digest.hex)),
                },
                "signature": _b64(signature),
            }
        else:
            envelope = dsse_envelope(key, statement)
            body = self.dsse_body(envelope=envelope, signer_pem=cert_pem)
            entry = self.tlog_entry(body, kind="dsse", integrated_time=when)
            doc["dsseEnvelope"] = envelope
        doc["verificationMaterial"] = {
            "certificate": {"rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))},
            "tlogEntries": [entry],
        }
        return json.dumps(doc).encode()

    # -- trusted root --

    def trusted_root(
        self, *, include_intermediate: bool = True, include_ctlog: bool = True
    ) -> dict[str, Any]:
        start = _rfc3339(self.epoch - dt.timedelta(days=1))
        chain = (
            [self.intermediate_cert, self.root_cert] if include_intermediate else [self.root_cert]
        )

        def log(key: TestKey, url: str) -> dict[str, Any]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": _b64(key.spki_der),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": start},
                },
                "logId": {"keyId": _b64(hashlib.sha256(key.spki_der).digest())},
            }

        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(self.rekor, "https://rekor.pullgate.test")],
            "certificateAuthorities": [
                {
                    "subject": {"organization": "pullgate-test", "commonName": "test-sigstore"},
                    "uri": "https://fulcio.pullgate.test",
                    "certChain": {
                        "certificates": [
                            {"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))}
                            for c in chain
                        ]
                    },
                    "validFor": {"start": start},
                }
            ],
            "ctlogs": [log(self.ct, "https://ct.pullgate.test")] if include_ctlog else [],
            "timestampAuthorities": [],
        }

    def write_trusted_root(self, path: Path, **options: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.trusted_root(**options), indent=1))
        return path


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


# ---- an in-memory ArtifactSource ---------------------------------------------------


@dataclass
class MemoryRegistry:
    """One repository in memory, implementing ``proxy.pipeline.gate.ArtifactSource``.

    ``fetched_blobs`` / ``fetched_manifests`` record every fetch, so tests can prove that
    work stayed bounded. ``spoofed_referrers`` lists extra descriptors under a subject
    whether or not the manifests are really about it.
    """

    blobs: dict[Digest, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    spoofed_referrers: dict[Digest, list[Descriptor]] = field(default_factory=dict)
    fetched_blobs: list[Digest] = field(default_factory=list)
    fetched_manifests: list[str] = field(default_factory=list)
    # Per-file plans of tar layers a verifier set (``expect_layer_files``).
    layer_plans: dict[Digest, Any] = field(default_factory=dict)

    def expect_layer_files(self, digest: Digest, plan: Any) -> None:
        self.layer_plans[digest] = plan

    def push_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[digest] = data
        return digest

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> Digest:
        digest = Digest.of(data)
        self.manifests[reference] = (data, media_type)
        self.manifests[str(digest)] = (data, media_type)
        return digest

    def add(self, artifact: Artifact) -> Digest:
        for blob in artifact.blobs:
            self.push_blob(blob)
        return self.push_manifest(
            artifact.tag or str(artifact.digest), artifact.manifest, artifact.media_type
        )

    async def manifest(self, reference: str, *, max_bytes: int) -> Manifest | None:
        self.fetched_manifests.append(reference)
        found = self.manifests.get(reference)
        if found is None:
            return None
        data, media_type = found
        if len(data) > max_bytes:
            raise ManifestTooLarge(f"manifest is {len(data)} bytes; the cap is {max_bytes}")
        return parse_manifest(data, media_type)

    async def blob(self, digest: Digest, *, max_bytes: int) -> bytes:
        self.fetched_blobs.append(digest)
        data = self.blobs.get(digest)
        if data is None:
            from proxy.oci.errors import BlobUnknown

            raise BlobUnknown(f"blob {digest} is unknown")
        if len(data) > max_bytes:
            raise Unsupported(f"blob is {len(data)} bytes; the cap is {max_bytes}")
        return data

    async def referrers(self, digest: Digest, artifact_type: str | None = None) -> Manifest | None:
        descriptors: list[Descriptor] = []
        seen: set[Digest] = set()
        for data, media_type in self.manifests.values():
            manifest = parse_manifest(data, media_type)
            if manifest.digest in seen or manifest.subject is None:
                continue
            if manifest.subject.digest != digest:
                continue
            seen.add(manifest.digest)
            descriptors.append(
                Descriptor(
                    media_type=manifest.media_type,
                    digest=manifest.digest,
                    size=len(data),
                    artifact_type=manifest.effective_artifact_type,
                    annotations=manifest.annotations,
                )
            )
        descriptors += self.spoofed_referrers.get(digest, [])
        if artifact_type is not None:
            descriptors = [d for d in descriptors if d.artifact_type == artifact_type]
        if not descriptors:
            return None
        return parse_manifest(build_index(descriptors), mt.OCI_INDEX)
