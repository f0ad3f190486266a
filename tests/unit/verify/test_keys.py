"""proxy.verify.keys: which signature schemes a public key accepts, and which keys are refused."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.verify.keys import KeyFormatError, load_certificates_pem, load_public_key_pem, wrap_key

DATA = b"the manifest"


@pytest.mark.parametrize(
    ("curve", "natural"),
    [
        (ec.SECP256R1(), hashes.SHA256()),
        (ec.SECP384R1(), hashes.SHA384()),
        (ec.SECP521R1(), hashes.SHA512()),
    ],
)
def test_ecdsa_accepts_the_curve_hash_and_sha256(
    curve: ec.EllipticCurve, natural: hashes.HashAlgorithm
) -> None:
    private = ec.generate_private_key(curve)
    key = wrap_key(private.public_key())
    for algorithm in (natural, hashes.SHA256()):
        signature = private.sign(DATA, ec.ECDSA(algorithm))
        assert key.verify(signature, DATA)
        assert not key.verify(signature, DATA + b"!")
        digest = hashlib.new(algorithm.name, DATA).digest()
        assert key.verify_digest(signature, digest, algorithm)


def test_ecdsa_refuses_a_signature_with_sha1() -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    assert not wrap_key(private.public_key()).verify(
        private.sign(DATA, ec.ECDSA(hashes.SHA1())), DATA
    )


def test_rsa_accepts_pkcs1v15_and_pss_and_refuses_another_message() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = wrap_key(private.public_key())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    for pad in (padding.PKCS1v15(), pss):
        signature = private.sign(DATA, pad, hashes.SHA256())
        assert key.verify(signature, DATA)
        assert not key.verify(signature, DATA + b"!")
    assert key.kind == "RSA-2048"


def test_verify_digest_refuses_a_digest_of_the_wrong_length() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    signature = private.sign(DATA, ec.ECDSA(hashes.SHA256()))
    short = hashlib.sha256(DATA).digest()[:20]
    assert not wrap_key(private.public_key()).verify_digest(signature, short, hashes.SHA256())


def test_ed25519_refuses_a_prehashed_message() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    key = wrap_key(private.public_key())
    signature = private.sign(DATA)
    assert key.verify(signature, DATA)
    assert not key.verify(signature, DATA + b"!")
    assert not key.verify_digest(signature, hashlib.sha256(DATA).digest(), hashes.SHA256())


@pytest.mark.parametrize(
    ("public", "why"),
    [
        (lambda: rsa.generate_private_key(65537, 1024).public_key(), "1024 bits is too weak"),
        (lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), "curve secp256k1"),
        (lambda: "not a key", "unsupported public key type str"),
    ],
)
def test_refuses_weak_or_unsupported_keys(public: Callable[[], object], why: str) -> None:
    with pytest.raises(KeyFormatError, match=why):
        wrap_key(public())


def test_refuses_a_pem_public_key_where_certificates_are_required() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert load_public_key_pem(pem).kind == "ECDSA secp256r1"
    with pytest.raises(KeyFormatError, match="not a PEM certificate"):
        load_certificates_pem(pem)
