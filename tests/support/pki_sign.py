"""A small X.509 PKI for chain tests, and OMS bundles signed with its certificates.

``issue(cn, issuer=..., ca=..., ...)`` returns an ``Issued`` (certificate and private key):
``issuer=None`` makes a self-signed certificate. ``ca`` None leaves basicConstraints out
(a plain leaf, as many signing certificates are). ``key_usage`` is ``"sign"``
(digitalSignature), ``"ca"`` (keyCertSign, cRLSign) or None. ``reissue`` copies a
certificate's subject and extensions under another issuer, as a forger would.

``oms_certificate_bundle(signer, chain, statement)`` is a model_signing-shaped Sigstore
bundle (v0.3, DSSE over an in-toto statement, ``x509CertificateChain``) signed by
``signer``'s ECDSA key.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING
BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: Any

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def new_key(kind: str = "ecdsa-p256") -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "ecdsa-p384" else ec.SECP256R1())


def _usage(kind: str) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=kind == "sign",
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=kind == "ca",
        crl_sign=kind == "ca",
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    cn: str,
    *,
    issuer: Issued | None = None,
    key: Any = None,
    ca: bool | None = None,
    path_length: int | None = None,
    key_usage: str | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = None,
    not_before: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=30),
) -> Issued:
    key = key or new_key()
    start = not_before or dt.datetime.now(UTC) - dt.timedelta(days=1)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pullgate"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if key_usage is not None:
        builder = builder.add_extension(_usage(key_usage), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    signing_key = issuer.key if issuer else key
    return Issued(builder.sign(signing_key, _hash_for(signing_key)), key)


def reissue(template: x509.Certificate, *, key: Any, issuer: Issued) -> Issued:
    """``template``'s subject and extensions on ``key``, signed by ``issuer``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    for extension in template.extensions:
        if isinstance(extension.value, x509.AuthorityKeyIdentifier):
            continue
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return Issued(builder.sign(issuer.key, _hash_for(issuer.key)), key)


def _hash_for(key: Any) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def oms_certificate_bundle(
    signer: Issued, chain: Sequence[x509.Certificate], statement: bytes
) -> bytes:
    """A bundle whose DSSE signature is ``signer``'s; ``chain`` is leaf first."""
    signature = signer.key.sign(pae(IN_TOTO, statement), ec.ECDSA(_hash_for(signer.key)))
    doc = {
        "mediaType": BUNDLE_TYPE,
        "verificationMaterial": {
            "x509CertificateChain": {
                "certificates": [
                    {"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))} for c in chain
                ]
            },
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": _b64(statement),
            "payloadType": IN_TOTO,
            "signatures": [{"sig": _b64(signature), "keyid": ""}],
        },
    }
    return json.dumps(doc).encode()
