"""Public keys in PEM and the signature schemes cosign and sigstore use with them.

Supported: ECDSA P-256/P-384/P-521 (ASN.1 DER signatures), RSA (PKCS#1 v1.5 and PSS) and
Ed25519. ECDSA and RSA signatures are checked with the hash that matches the key size
(SHA-256 for P-256 and RSA, SHA-384 for P-384, SHA-512 for P-521) and, because cosign
signs with SHA-256 whatever the curve, with SHA-256 as well. Both are collision
resistant, so accepting either does not widen what a signature can be made to cover.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from proxy.verify.base import SignatureError, first_line

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

MAX_PEM_BYTES = 64 * 1024
MIN_RSA_BITS = 2048

_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


class KeyFormatError(ValueError):
    """Bytes that are not a supported public key, certificate or signature encoding."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A supported public key (of a type and strength ``wrap_key`` accepts)."""

    key: PublicKey

    @property
    def spki_der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def kind(self) -> str:
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return f"ECDSA {self.key.curve.name}"
        if isinstance(self.key, rsa.RSAPublicKey):
            return f"RSA-{self.key.key_size}"
        return "Ed25519"

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is a valid signature by this key over ``data``."""
        if isinstance(self.key, ed25519.Ed25519PublicKey):
            with contextlib.suppress(InvalidSignature):
                self.key.verify(signature, data)
                return True
            return False
        algorithms: list[hashes.HashAlgorithm] = [hashes.SHA256()]
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            natural = _CURVE_HASH.get(self.key.curve.name, hashes.SHA256)
            if natural is not hashes.SHA256:
                algorithms.insert(0, natural())
        return any(
            self.verify_digest(signature, hashlib.new(algorithm.name, data).digest(), algorithm)
            for algorithm in algorithms
        )

    def verify_digest(
        self, signature: bytes, digest: bytes, algorithm: hashes.HashAlgorithm
    ) -> bool:
        """Whether ``signature`` signs the message whose ``algorithm`` digest is ``digest``.

        Ed25519 cannot sign a prehashed message: it always returns False here, and callers
        that may hold an Ed25519 key must pass the message itself to ``verify``.
        """
        if isinstance(self.key, ed25519.Ed25519PublicKey) or len(digest) != algorithm.digest_size:
            return False
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
                return True
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
            for pad in (padding.PKCS1v15(), pss):
                with contextlib.suppress(InvalidSignature):
                    self.key.verify(signature, digest, pad, Prehashed(algorithm))
                    return True
        except (InvalidSignature, ValueError):
            return False
        return False


def wrap_key(key: object) -> VerificationKey:
    """Accept a loaded public key if it is of a supported type and strength."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _CURVE_HASH:
        raise KeyFormatError(f"unsupported elliptic curve {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise KeyFormatError(f"RSA key of {key.key_size} bits is too weak")
    if not isinstance(key, PublicKey):
        raise KeyFormatError(f"unsupported public key type {type(key).__name__}")
    return VerificationKey(key)


def load_public_key_pem(data: bytes) -> VerificationKey:
    """Parse one PEM ``PUBLIC KEY`` (SPKI) block; raise ``KeyFormatError`` otherwise."""
    if len(data) > MAX_PEM_BYTES:
        raise KeyFormatError("public key PEM is too large")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"not a PEM public key: {first_line(exc, 120)}") from exc
    return wrap_key(key)


def load_certificates_pem(data: bytes, *, max_count: int = 10) -> list[x509.Certificate]:
    """Parse one or more PEM certificates (a chain); at least one is required."""
    if len(data) > MAX_PEM_BYTES:
        raise KeyFormatError("certificate PEM is too large")
    if data.count(b"-----BEGIN CERTIFICATE-----") > max_count:
        raise KeyFormatError(f"more than {max_count} certificates")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        # Also when no block is a certificate: cryptography refuses to return none.
        raise KeyFormatError(f"not a PEM certificate: {first_line(exc, 120)}") from exc
    return certs


def certificate_key(cert: x509.Certificate) -> VerificationKey:
    """The supported public key of ``cert``."""
    try:
        return wrap_key(cert.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"certificate key: {first_line(exc, 120)}") from exc


def b64decode_strict(text: str | bytes, *, what: str) -> bytes:
    """Decode standard base64, tolerating line breaks (cosign may wrap it) but nothing else."""
    raw = text.encode() if isinstance(text, str) else text
    compact = b"".join(raw.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{what} is not valid base64") from exc


def b64_field(value: Any, *, what: str) -> bytes:
    """A base64 field of a signature document, strictly decoded; else ``SignatureError``."""
    if not isinstance(value, str):
        raise SignatureError(f"{what} is missing")
    try:
        return b64decode_strict(value, what=what)
    except KeyFormatError as exc:
        raise SignatureError(str(exc)) from exc
