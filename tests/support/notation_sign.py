"""A test Notation signer: a test CA, JWS and COSE envelopes, signature manifests.

``TestNotary()`` holds a root CA and a code-signing leaf (RSA of ``rsa_bits``, PS256,
PS384 or PS512 by size; or ECDSA with ``curve=``, ES256/384/512 with r || s
signatures); ``algorithm=`` claims and signs with another algorithm than the key's;
``notary.signer(name)`` is another leaf under the same root. ``notary.intermediates``
(empty) go into x5c between the leaf and the root.
``notary.jws(descriptor, ...)`` / ``notary.cose(descriptor, ...)`` return envelope bytes
over a target descriptor dict (``mediaType``, ``digest``, ``size``); options: ``expiry``,
``signing_time``, ``extra_critical``, ``tamper`` (flip a signature byte), ``authority``
(the signingAuthority scheme, its ``authenticSigningTime`` critical or not).
``notary.write_trust(dir, scope=...)`` writes ``trustpolicy.json`` and
``truststore/x509/ca/test/root.pem``. ``signature_artifact(envelope, media_type, subject)``
builds the referrer manifest (``cosign_sign.Artifact``).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.oci.digest import Digest
from tests.support.cosign_sign import Artifact

PAYLOAD_TYPE = "application/vnd.cncf.notary.payload.v1+json"
_EC_BITS = {"secp256r1": "256", "secp384r1": "384", "secp521r1": "512"}
_RSA_ALGORITHMS = {2048: "PS256", 3072: "PS384", 4096: "PS512"}
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
COSE_ALGORITHMS = {
    "PS256": -37,
    "PS384": -38,
    "PS512": -39,
    "ES256": -7,
    "ES384": -35,
    "ES512": -36,
}
UTC = dt.UTC


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pullgate"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    """A keyUsage extension with only the given bits (the Notary Project certificate
    requirements: digitalSignature on signing certificates, keyCertSign on CAs)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class TestNotary:
    __test__ = False

    def __init__(
        self,
        *,
        leaf_not_before: dt.datetime | None = None,
        leaf_lifetime: dt.timedelta = dt.timedelta(days=365),
        name: str = "release signer",
        curve: ec.EllipticCurve | None = None,
        rsa_bits: int = 2048,
        algorithm: str | None = None,
    ) -> None:
        self.curve = curve
        self.rsa_bits = rsa_bits
        self._algorithm = algorithm
        now = dt.datetime.now(UTC)
        self.root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.root = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} root"))
            .issuer_name(_name(f"{name} root"))
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(key_usage(key_cert_sign=True), critical=True)
            .sign(self.root_key, hashes.SHA256())
        )
        self.intermediates: list[x509.Certificate] = []
        self._issue_leaf(name, leaf_not_before or now - dt.timedelta(hours=1), leaf_lifetime)

    def _issue_leaf(self, name: str, start: dt.datetime, lifetime: dt.timedelta) -> None:
        self.key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=self.rsa_bits)
            if self.curve is None
            else ec.generate_private_key(self.curve)
        )
        self.leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.root.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.identity = f"x509.subject:CN={name},O=pullgate,C=US"

    def signer(self, name: str) -> TestNotary:
        """Another signer under this notary's root CA (so it chains to the same trust
        store), with its own key and a leaf whose subject is ``CN=name``."""
        other = copy.copy(self)
        other._issue_leaf(
            name, dt.datetime.now(UTC) - dt.timedelta(hours=1), dt.timedelta(days=365)
        )
        return other

    @property
    def algorithm(self) -> str:
        """The JOSE name of the signing algorithm: the one given, else the key's
        (PS256/384/512 by RSA size, ES256/384/512 by curve)."""
        if self._algorithm is not None:
            return self._algorithm
        if self.curve is None:
            return _RSA_ALGORITHMS.get(self.rsa_bits, "PS256")
        return f"ES{_EC_BITS[self.curve.name]}"

    def _sign(self, data: bytes) -> bytes:
        digest = _HASHES[self.algorithm[2:]]()
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(
                data,
                padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size),
                digest,
            )
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(digest)))
        size = (self.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def _chain(self) -> list[bytes]:
        certificates = (self.leaf, *self.intermediates, self.root)
        return [c.public_bytes(serialization.Encoding.DER) for c in certificates]

    def jws(
        self,
        descriptor: dict[str, Any],
        *,
        expiry: dt.datetime | None = None,
        extra_critical: tuple[str, ...] = (),
        tamper: bool = False,
        authority: bool = False,
        authentic_time_critical: bool = True,
    ) -> bytes:
        now = dt.datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        protected: dict[str, Any] = {
            "alg": self.algorithm,
            "cty": PAYLOAD_TYPE,
            "crit": ["io.cncf.notary.signingScheme", *extra_critical],
            "io.cncf.notary.signingScheme": "notary.x509",
            "io.cncf.notary.signingTime": now,
        }
        if authority:  # notary.x509.signingAuthority: the time comes from the authority
            del protected["io.cncf.notary.signingTime"]
            protected["io.cncf.notary.signingScheme"] = "notary.x509.signingAuthority"
            protected["io.cncf.notary.authenticSigningTime"] = now
            if authentic_time_critical:
                protected["crit"].append("io.cncf.notary.authenticSigningTime")
        for key in extra_critical:
            protected[key] = "required"
        if expiry is not None:
            protected["crit"].append("io.cncf.notary.expiry")
            protected["io.cncf.notary.expiry"] = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        protected_b64 = _b64url(json.dumps(protected).encode())
        payload_b64 = _b64url(json.dumps({"targetArtifact": descriptor}).encode())
        signature = bytearray(self._sign(f"{protected_b64}.{payload_b64}".encode()))
        if tamper:
            signature[10] ^= 0xFF
        envelope = {
            "payload": payload_b64,
            "protected": protected_b64,
            "header": {
                "x5c": [base64.b64encode(d).decode() for d in self._chain()],
                "io.cncf.notary.signingAgent": "pullgate-tests",
            },
            "signature": _b64url(bytes(signature)),
        }
        return json.dumps(envelope).encode()

    def cose(
        self,
        descriptor: dict[str, Any],
        *,
        expiry: dt.datetime | None = None,
        algorithm_label: int | str | None = None,
    ) -> bytes:
        protected: dict[Any, Any] = {
            1: COSE_ALGORITHMS[self.algorithm] if algorithm_label is None else algorithm_label,
            2: ["io.cncf.notary.signingScheme"],
            3: PAYLOAD_TYPE,
            "io.cncf.notary.signingScheme": "notary.x509",
            "io.cncf.notary.signingTime": cbor2.CBORTag(1, int(dt.datetime.now(UTC).timestamp())),
        }
        if expiry is not None:
            protected[2].append("io.cncf.notary.expiry")
            protected["io.cncf.notary.expiry"] = cbor2.CBORTag(1, int(expiry.timestamp()))
        protected_raw = cbor2.dumps(protected)
        payload = json.dumps({"targetArtifact": descriptor}).encode()
        signature = self._sign(cbor2.dumps(["Signature1", protected_raw, b"", payload]))
        unprotected = {33: self._chain(), "io.cncf.notary.signingAgent": "pullgate-tests"}
        return cbor2.dumps(cbor2.CBORTag(18, [protected_raw, unprotected, payload, signature]))

    def write_trust(self, directory: Path, *, scope: str = "*", level: str = "strict") -> None:
        store = directory / "truststore" / "x509" / "ca" / "test"
        store.mkdir(parents=True, exist_ok=True)
        (store / "root.pem").write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        policy = {
            "version": "1.0",
            "trustPolicies": [
                {
                    "name": "test",
                    "registryScopes": [scope],
                    "signatureVerification": {"level": level},
                    "trustStores": ["ca:test"],
                    "trustedIdentities": [self.identity],
                }
            ],
        }
        (directory / "trustpolicy.json").write_text(json.dumps(policy))


def descriptor_of(manifest: bytes, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(manifest)), "size": len(manifest)}


def signature_artifact(envelope: bytes, media_type: str, subject: dict[str, Any]) -> Artifact:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.notary.signature",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": str(Digest.of(b"{}")),
            "size": 2,
        },
        "layers": [
            {"mediaType": media_type, "digest": str(Digest.of(envelope)), "size": len(envelope)}
        ],
        "subject": subject,
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return Artifact(raw, "application/vnd.oci.image.manifest.v1+json", (b"{}", envelope))
