"""Notation verifier: generated JWS/COSE signatures, refusals, and the real vectors."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from proxy.verify.base import Limits, PolicyError, SignatureError, Subject
from proxy.verify.notation import (
    COSE,
    JWS,
    LEVELS,
    NotationVerifier,
    TrustStatement,
    cbor_item,
    load_store,
    load_trust_policy,
    notation_verifier_from_spec,
    parse_cose,
    parse_envelope,
)
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors" / "notation-go"
UTC = dt.UTC


def setup(tmp_path: Path, notary: TestNotary, *, level: str = "strict"):  # type: ignore[no-untyped-def]
    registry = cs.MemoryRegistry()
    image = cs.image_manifest([b"notation layer"])
    registry.add(image)
    notary.write_trust(tmp_path, level=level)
    verifier = notation_verifier_from_spec(
        {"trustPolicy": "trustpolicy.json", "trustStore": "truststore"}, base_dir=tmp_path
    )
    subject = Subject(
        registry="registry.example.test",
        repository="app",
        digest=image.digest,
        media_type=image.media_type,
        size=len(image.manifest),
    )
    return registry, image, verifier, subject


async def test_generated_jws_and_cose_signatures_verify(tmp_path: Path) -> None:
    notary = TestNotary()
    _, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    for envelope, media_type in ((notary.jws(target), JWS), (notary.cose(target), COSE)):
        fresh = cs.MemoryRegistry()
        fresh.add(image)
        fresh.add(signature_artifact(envelope, media_type, target))
        result = await verifier.verify(subject, fresh, Limits())
        assert result.ok, result.reason
    assert verifier.describe() == "notation trustPolicy trustpolicy.json"


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
async def test_generated_ecdsa_jws_and_cose_signatures_verify(
    tmp_path: Path, curve: ec.EllipticCurve
) -> None:
    notary = TestNotary(curve=curve)
    _, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    for envelope, media_type in ((notary.jws(target), JWS), (notary.cose(target), COSE)):
        fresh = cs.MemoryRegistry()
        fresh.add(image)
        fresh.add(signature_artifact(envelope, media_type, target))
        result = await verifier.verify(subject, fresh, Limits())
        assert result.ok, result.reason


async def test_refuses_cose_ecdsa_signature_in_der_encoding(tmp_path: Path) -> None:
    """COSE (RFC 9053 section 2.1) carries ECDSA as r || s; an ASN.1 DER signature, what
    a verifier written for X.509 would take, is not a COSE signature."""
    notary = TestNotary(curve=ec.SECP256R1())
    _, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    tagged = cbor2.loads(notary.cose(target))
    protected_raw, unprotected, payload, raw_signature = tagged.value
    half = len(raw_signature) // 2
    der = encode_dss_signature(
        int.from_bytes(raw_signature[:half], "big"), int.from_bytes(raw_signature[half:], "big")
    )
    envelope = cbor2.dumps(cbor2.CBORTag(18, [protected_raw, unprotected, payload, der]))
    registry = cs.MemoryRegistry()
    registry.add(image)
    registry.add(signature_artifact(envelope, COSE, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok
    assert "does not verify (integrity)" in result.reason


@pytest.mark.parametrize("media_type", [JWS, COSE])
async def test_refuses_ecdsa_algorithm_claimed_for_another_curve(
    tmp_path: Path, media_type: str
) -> None:
    """ES256 over a P-384 key: the algorithm names the curve (RFC 7518 3.4, RFC 9053 2.1),
    so the header cannot pick a weaker hash than the key's."""
    notary = TestNotary(curve=ec.SECP384R1())
    _, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)

    def es256(data: bytes) -> bytes:
        assert isinstance(notary.key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(notary.key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    if media_type == JWS:
        doc = json.loads(notary.jws(target))
        protected = json.loads(base64.urlsafe_b64decode(doc["protected"] + "=="))
        protected["alg"] = "ES256"
        doc["protected"] = (
            base64.urlsafe_b64encode(json.dumps(protected).encode()).rstrip(b"=").decode()
        )
        signature = es256(f"{doc['protected']}.{doc['payload']}".encode())
        doc["signature"] = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        envelope = json.dumps(doc).encode()
    else:
        protected_raw, unprotected, payload, _ = cbor2.loads(notary.cose(target)).value
        header = dict(cbor2.loads(protected_raw))
        header[1] = -7  # ES256
        protected_raw = cbor2.dumps(header)
        signature = es256(cbor2.dumps(["Signature1", protected_raw, b"", payload]))
        envelope = cbor2.dumps(
            cbor2.CBORTag(18, [protected_raw, dict(unprotected), payload, signature])
        )
    registry = cs.MemoryRegistry()
    registry.add(image)
    registry.add(signature_artifact(envelope, media_type, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok
    assert "does not verify (integrity)" in result.reason


async def _verify_both(tmp_path: Path, notary: TestNotary, signature=None):  # type: ignore[no-untyped-def]
    """Verify a JWS and a COSE envelope of ``notary`` (each in its own trust dir), the
    signature bytes passed through ``signature`` first when given; the two results."""
    results = []
    for media_type in (JWS, COSE):
        _, image, verifier, subject = setup(tmp_path / media_type.rsplit("/", 1)[-1], notary)
        target = descriptor_of(image.manifest, image.media_type)
        if media_type == JWS:
            envelope = notary.jws(target)
            if signature is not None:
                doc = json.loads(envelope)
                raw = base64.urlsafe_b64decode(doc["signature"] + "==")
                doc["signature"] = base64.urlsafe_b64encode(signature(raw)).rstrip(b"=").decode()
                envelope = json.dumps(doc).encode()
        else:
            envelope = notary.cose(target)
            if signature is not None:
                protected_raw, unprotected, payload, raw = cbor2.loads(envelope).value
                envelope = cbor2.dumps(
                    cbor2.CBORTag(18, [protected_raw, dict(unprotected), payload, signature(raw)])
                )
        registry = cs.MemoryRegistry()
        registry.add(image)
        registry.add(signature_artifact(envelope, media_type, target))
        results.append(await verifier.verify(subject, registry, Limits()))
    return results


@pytest.mark.parametrize(("rsa_bits", "algorithm"), [(3072, "PS384"), (4096, "PS512")])
async def test_rsa_keys_of_each_notation_size_verify(
    tmp_path: Path, rsa_bits: int, algorithm: str
) -> None:
    notary = TestNotary(rsa_bits=rsa_bits)
    assert notary.algorithm == algorithm
    for result in await _verify_both(tmp_path, notary):
        assert result.ok, result.reason


@pytest.mark.parametrize(
    ("rsa_bits", "algorithm"), [(1024, "PS256"), (1536, "PS384"), (4096, "PS256"), (2048, "PS512")]
)
async def test_refuses_rsa_key_size_or_algorithm_outside_notation_key_specs(
    tmp_path: Path, rsa_bits: int, algorithm: str
) -> None:
    """The Notary Project signs with RSA 2048/3072/4096 only, each with its own PSS hash
    (PS256/384/512), as notation-go checks: a short key is refused whatever it claims,
    and an algorithm is not taken from the header for a key of another size."""
    notary = TestNotary(rsa_bits=rsa_bits, algorithm=algorithm)
    for result in await _verify_both(tmp_path, notary):
        assert not result.ok
        assert f"{rsa_bits}-bit RSA" in result.reason, result.reason


@pytest.mark.parametrize(
    "reencode",
    [
        lambda sig: b"\0" + sig[:32] + b"\0" + sig[32:],  # each half zero-padded
        lambda sig: sig[:32] + b"\0" + sig[32:],  # odd length, s padded
    ],
    ids=["padded", "odd-length"],
)
async def test_refuses_ecdsa_signature_not_twice_the_curve_size(tmp_path: Path, reencode) -> None:  # type: ignore[no-untyped-def]
    """r || s is exactly two curve-size integers (RFC 7518 3.4, RFC 9053 2.1); a padded
    or odd-length encoding of a valid signature is another envelope with the same
    signature (malleable), which notation-go refuses."""
    notary = TestNotary(curve=ec.SECP256R1())
    for result in await _verify_both(tmp_path, notary, signature=reencode):
        assert not result.ok
        assert "64 bytes" in result.reason, result.reason


@pytest.mark.parametrize("field", ["digest", "size", "mediaType"])
async def test_refuses_notation_target_mismatch(tmp_path: Path, field: str) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    signed = dict(target)
    signed[field] = {
        "digest": str(Digest.of(b"other")),
        "size": target["size"] + 1,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    }[field]
    registry.add(signature_artifact(notary.jws(signed), JWS, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok
    assert "does not match" in result.reason


async def test_refuses_expired_notation_signature(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    past = dt.datetime.now(UTC) - dt.timedelta(days=1)
    registry.add(signature_artifact(notary.cose(target, expiry=past), COSE, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "expired" in result.reason


async def test_permissive_level_only_logs_expiry(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary, level="permissive")
    target = descriptor_of(image.manifest, image.media_type)
    past = dt.datetime.now(UTC) - dt.timedelta(days=1)
    registry.add(signature_artifact(notary.jws(target, expiry=past), JWS, target))
    assert (await verifier.verify(subject, registry, Limits())).ok


async def test_refuses_expired_signing_certificate(tmp_path: Path) -> None:
    old = dt.datetime.now(UTC) - dt.timedelta(days=30)
    notary = TestNotary(leaf_not_before=old, leaf_lifetime=dt.timedelta(days=1))
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    registry.add(signature_artifact(notary.jws(target), JWS, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "not valid at" in result.reason


async def test_refuses_signature_from_untrusted_ca(tmp_path: Path) -> None:
    trusted, rogue = TestNotary(), TestNotary()
    registry, image, verifier, subject = setup(tmp_path, trusted)
    target = descriptor_of(image.manifest, image.media_type)
    registry.add(signature_artifact(rogue.jws(target), JWS, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "trust store" in result.reason


async def test_refuses_tampered_envelope_signature(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    registry.add(signature_artifact(notary.jws(target, tamper=True), JWS, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "integrity" in result.reason


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _same_bytes_other_text(text: str) -> str:
    """``text`` with its last character's unused bits set: other text, same bytes."""
    assert len(text) % 4 in (2, 3), "no unused bits to set"
    return text[:-1] + B64URL[B64URL.index(text[-1]) | 1]


async def test_refuses_jws_payload_whose_text_is_not_what_was_signed(tmp_path: Path) -> None:
    # notation-go verifies the signature over the payload's text; jwcrypto re-encodes
    # the decoded payload. A non-canonical text of the same bytes must not verify.
    notary = TestNotary()
    _registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    for pad in range(4):
        padded = {**target, "annotations": {"pad": "x" * pad}}
        doc = json.loads(notary.jws(padded))
        if len(doc["payload"]) % 4 in (2, 3):
            break
    statement = verifier._statements[0]
    # Annotations are not part of what Notation compares: the envelope as signed verifies.
    assert verifier.check_envelope(JWS, json.dumps(doc).encode(), subject, statement) is None
    doc["payload"] = _same_bytes_other_text(doc["payload"])
    reason = verifier.check_envelope(JWS, json.dumps(doc).encode(), subject, statement)
    assert reason is not None and "payload is not canonical unpadded base64url" in reason


async def test_refuses_jws_in_general_serialization(tmp_path: Path) -> None:
    notary = TestNotary()
    _registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    doc = json.loads(notary.jws(target))
    general = {
        "payload": doc["payload"],
        "signatures": [{k: doc[k] for k in ("protected", "header", "signature")}],
    }
    reason = verifier.check_envelope(
        JWS, json.dumps(general).encode(), subject, verifier._statements[0]
    )
    assert reason is not None and "not a flattened JWS" in reason


@pytest.mark.parametrize("media_type", [JWS, COSE])
async def test_refuses_envelope_payload_nested_deeper_than_the_json_parser(
    tmp_path: Path, media_type: str
) -> None:
    """A payload of 100k nested arrays (within the envelope cap) made Python's JSON
    parser raise RecursionError, which escaped the verifier as a crash, not a refusal."""
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    deep = b"[" * 100_000 + b"]" * 100_000
    if media_type == JWS:
        doc = json.loads(notary.jws(target))
        doc["payload"] = base64.urlsafe_b64encode(deep).rstrip(b"=").decode()
        envelope = json.dumps(doc).encode()
    else:
        protected_raw, unprotected, _, raw_signature = cbor2.loads(notary.cose(target)).value
        envelope = cbor2.dumps(
            cbor2.CBORTag(18, [protected_raw, dict(unprotected), deep, raw_signature])
        )
    registry.add(signature_artifact(envelope, media_type, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok
    assert "payload is not valid JSON" in result.reason, result.reason


async def test_refuses_unknown_critical_header(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    envelope = notary.jws(target, extra_critical=("io.example.mustUnderstand",))
    registry.add(signature_artifact(envelope, JWS, target))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "critical" in result.reason


def test_refuses_signing_authority_time_not_marked_critical(tmp_path: Path) -> None:
    """notary.x509.signingAuthority rests on authenticSigningTime: the spec makes it a
    critical header, so a verifier that ignored it could not skip it silently."""
    notary = TestNotary()
    _, image, _, _ = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    marked = parse_envelope(JWS, notary.jws(target, authority=True))
    assert marked.scheme == "notary.x509.signingAuthority"
    assert marked.authentic_signing_time is not None
    unmarked = notary.jws(target, authority=True, authentic_time_critical=False)
    with pytest.raises(SignatureError, match="authenticSigningTime is not marked critical"):
        parse_envelope(JWS, unmarked)


@pytest.mark.parametrize(
    "label", ["ES256", "PS256", -8, True], ids=["es256-text", "ps256-text", "eddsa", "bool"]
)
def test_refuses_cose_algorithm_that_is_not_a_notary_label(
    tmp_path: Path, label: int | str
) -> None:
    notary = TestNotary(curve=ec.SECP256R1())
    _, image, _, _ = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    assert parse_cose(notary.cose(target)).algorithm == "ES256"  # the label -7
    with pytest.raises(SignatureError, match="is not a Notary algorithm"):
        parse_cose(notary.cose(target, algorithm_label=label))


async def test_refuses_referrer_spoofing_signature_for_another_subject(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    other = cs.image_manifest([b"another image"])
    registry.add(other)
    other_target = descriptor_of(other.manifest, other.media_type)
    spoof = signature_artifact(notary.jws(other_target), JWS, other_target)
    registry.add(spoof)
    # Listed under our image, but its manifest's subject is the other one.
    registry.spoofed_referrers[image.digest] = [
        Descriptor(
            media_type=spoof.media_type,
            digest=spoof.digest,
            size=len(spoof.manifest),
            artifact_type="application/vnd.cncf.notary.signature",
        )
    ]
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "referrer is about another manifest" in result.reason


async def test_refuses_unsigned_and_bounds_a_signature_flood(tmp_path: Path) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    assert not (await verifier.verify(subject, registry, Limits())).ok
    rogue = TestNotary()
    target = descriptor_of(image.manifest, image.media_type)
    envelope = rogue.jws(target)
    for number in range(50):
        artifact = signature_artifact(envelope + b" " * number, JWS, target)
        registry.add(artifact)
    result = await verifier.verify(subject, registry, Limits(max_signatures=5))
    assert not result.ok
    assert len(registry.fetched_blobs) <= 5


@pytest.mark.parametrize(
    "envelope",
    [b"not json", b"{}", b'{"protected": "!!", "payload": "e30", "signature": "", "header": {}}'],
)
async def test_refuses_malformed_jws_cleanly(tmp_path: Path, envelope: bytes) -> None:
    notary = TestNotary()
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    registry.add(signature_artifact(envelope, JWS, target))
    assert not (await verifier.verify(subject, registry, Limits())).ok


def test_refuses_invalid_trust_policy_files(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"version": "1.0", "trustPolicies": []}))
    with pytest.raises(PolicyError):
        load_trust_policy(tmp_path / "p.json")
    with pytest.raises(PolicyError):
        notation_verifier_from_spec({"trustPolicy": "p.json"}, base_dir=tmp_path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_cbor_decoder_never_crashes(data: bytes) -> None:
    with contextlib.suppress(SignatureError):
        cbor_item(data, "fuzz")
    with contextlib.suppress(SignatureError):
        parse_cose(data)


def test_cbor_refuses_unhashable_map_keys() -> None:
    # Found by the fuzz suite: a tagged map as a map key made the decoder crash.
    with pytest.raises(SignatureError):
        cbor_item(b"\xa3\x00\x00\x01\x00\xc0\xa0", "map")
    # An array as a key decodes (as a tuple), but is no COSE header label.
    with pytest.raises(SignatureError, match="integer or text labels"):
        parse_cose(cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x80\x00", {}, b"{}", b"sig"])))


def test_cbor_round_trip_and_limits() -> None:
    value = cbor2.CBORTag(18, [b"\x01", {33: [b"der"], "k": -7}, b"payload", b"sig"])
    # cbor2 decodes a tag's contents immutably: arrays come back as tuples.
    decoded = cbor2.CBORTag(18, (b"\x01", {33: (b"der",), "k": -7}, b"payload", b"sig"))
    assert cbor_item(cbor2.dumps(value), "value") == decoded
    with pytest.raises(SignatureError):
        cbor_item(b"\x81" * 100 + b"\x00", "deep")  # too deep
    with pytest.raises(SignatureError):
        cbor_item(b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", "long")  # length past the input


def test_refuses_ambiguous_cose_encodings() -> None:
    """What two CBOR readers could read differently is refused before any crypto."""
    protected = cbor2.dumps({1: -37, 3: "application/vnd.cncf.notary.payload.v1+json"})
    for raw, reason in [
        (b"\xa2\x01\x26\x01\x24", "not valid CBOR"),  # duplicate label 1 (alg)
        (b"\xa1\xf5\x26", "integer or text labels"),  # `true` as label, equal to 1 in Python
        (b"\xbf\x01\x26\xff", "not valid CBOR"),  # indefinite-length map
    ]:
        envelope = cbor2.dumps(cbor2.CBORTag(18, [raw, {}, b"{}", b"sig"]))
        with pytest.raises(SignatureError, match=reason):
            parse_cose(envelope)
    valid = cbor2.dumps(cbor2.CBORTag(18, [protected, {33: [b"x"]}, b"{}", b"sig"]))
    with pytest.raises(SignatureError, match="trailing bytes"):
        parse_cose(valid + b"\x00")


# ---- real vectors (../shared/vectors/notation-go) ------------------------------------


def _vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"signature vectors not found at {VECTORS}")
    return VECTORS


MOCK_TARGET = Subject(
    registry="registry.acme-rockets.io",
    repository="software/net-monitor",
    digest=Digest.parse("sha256:60043cf45eaebc4c0867fea485a039b598f52fd09fd5b07b0b2d2f88fad9d74e"),
    media_type="application/vnd.docker.distribution.manifest.v2+json",
    size=528,
)


def _mock_verifier(
    store: str = "valid-trust-store", identity: str | None = None
) -> tuple[NotationVerifier, TrustStatement]:
    root = _vectors()
    statements = load_trust_policy(root / "derived" / "trustpolicy.mock-envelopes.json")
    statement = statements[0]
    if identity is not None or store != "valid-trust-store":
        statement = TrustStatement(
            name=statement.name,
            scopes=statement.scopes,
            level=statement.level,
            actions=statement.actions,
            stores=(("ca", store), ("signingAuthority", store)),
            identities=(identity,) if identity else statement.identities,
        )
    truststore = root / "verifier" / "testdata" / "truststore"
    stores = {}
    for kind, name in statement.stores:
        try:
            stores[(kind, name)] = load_store(truststore, kind, name)
        except PolicyError:
            continue
    return NotationVerifier(label="vectors", statements=(statement,), stores=stores), statement


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ca_valid_sig_env.json", None),
        ("sa_valid_sig_env.json", None),
        ("ca_invalid_sig_env.json", "integrity"),
        ("sa_invalid_sig_env.json", "integrity"),
        ("ca_expired_sig_env.json", "expired"),
        ("sa_expired_sig_env.json", "expired"),
        ("ca_plugin_sig_env.json", "plugin"),
        ("sa_plugin_sig_env.json", "plugin"),
        ("ca_compatible_pluginver_sig_env_1.0.0.json", "plugin"),
        ("ca_incompatible_pluginver_sig_env_1.2.3.json", "plugin"),
    ],
)
def test_vector_mock_envelopes_verify_as_documented(name: str, expected: str | None) -> None:
    verifier, statement = _mock_verifier()
    raw = (_vectors() / "internal" / "mock" / "testdata" / name).read_bytes()
    reason = verifier.check_envelope(JWS, raw, MOCK_TARGET, statement)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_vector_valid_envelope_refused_with_other_trust_store() -> None:
    verifier, statement = _mock_verifier(store="valid-trust-store-2")
    raw = (_vectors() / "internal" / "mock" / "testdata" / "ca_valid_sig_env.json").read_bytes()
    reason = verifier.check_envelope(JWS, raw, MOCK_TARGET, statement)
    assert reason is not None and "trust store" in reason


def test_vector_valid_envelope_refused_for_other_identity() -> None:
    verifier, statement = _mock_verifier(
        identity="x509.subject:CN=LOL,O=DummyOrg,L=Hyderabad,ST=TG,C=IN"
    )
    raw = (_vectors() / "internal" / "mock" / "testdata" / "ca_valid_sig_env.json").read_bytes()
    reason = verifier.check_envelope(JWS, raw, MOCK_TARGET, statement)
    assert reason is not None and "trusted identity" in reason


@pytest.mark.parametrize(
    ("file", "media_type"), [("jws_signature.sig", JWS), ("cose_signature.sig", COSE)]
)
def test_vector_real_alpine_signatures_verify(file: str, media_type: str) -> None:
    root = _vectors()
    anchor = x509.load_pem_x509_certificate((root / "derived" / "alpine-signer.crt").read_bytes())
    statement = TrustStatement(
        name="alpine",
        scopes=("*",),
        level="strict",
        actions=LEVELS["strict"],
        stores=(("ca", "alpine"),),
        identities=("x509.subject:CN=alpine,O=Notary,L=Seattle,ST=WA,C=US",),
    )
    verifier = NotationVerifier(
        label="alpine", statements=(statement,), stores={("ca", "alpine"): [anchor]}
    )
    subject = Subject(
        registry="docker.io",
        repository="library/alpine",
        digest=Digest.parse(
            "sha256:19dbd2e48e921426ee8ace4dc892edfb2ecdc1d1a72d5416c83670c30acecef0"
        ),
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=481,
    )
    raw = (root / "internal" / "testdata" / file).read_bytes()
    assert verifier.check_envelope(media_type, raw, subject, statement) is None
    other = Subject(
        registry="docker.io",
        repository="library/alpine",
        digest=Digest.of(b"other"),
        media_type=subject.media_type,
        size=481,
    )
    reason = verifier.check_envelope(media_type, raw, other, statement)
    assert reason is not None and "does not match" in reason


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("jwsWithTimestamp.sig", None),
        ("coseWithTimestamp.sig", None),
        ("withoutTimestamp.sig", None),
        ("jwsExpiredWithTimestamp.sig", "not valid at"),
        ("coseExpiredWithTimestamp.sig", "not valid at"),
        ("timestampBeforeNotBefore.sig", "not valid at"),
        ("timestampAfterNotAfter.sig", "not valid at"),
    ],
)
def test_vector_timestamped_envelopes_verify_as_documented(name: str, expected: str | None) -> None:
    testdata = _vectors() / "verifier" / "testdata"
    statement = TrustStatement(
        name="timestamp",
        scopes=("*",),
        level="strict",
        actions=LEVELS["strict"],
        stores=(("ca", "valid-trust-store"),),
        identities=("*",),
    )
    verifier = NotationVerifier(
        label="timestamp",
        statements=(statement,),
        stores={
            ("ca", "valid-trust-store"): load_store(
                testdata / "truststore", "ca", "valid-trust-store"
            )
        },
    )
    subject = Subject(
        registry="r.test",
        repository="a",
        digest=Digest.parse(
            "sha256:c0669ef34cdc14332c0f1ab0c2c01acb91d96014b172f1a76f3a39e63d1f0bda"
        ),
        media_type="application/vnd.docker.distribution.manifest.v2+json",
        size=528,
    )
    raw = (testdata / "timestamp" / "sigEnv" / name).read_bytes()
    media_type = JWS if raw.lstrip().startswith(b"{") else COSE
    reason = verifier.check_envelope(media_type, raw, subject, statement)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


# An ecPublicKey SubjectPublicKeyInfo's algorithm OID, a same-length OID no library
# knows, and the P-256 curve OID that precedes the public point's BIT STRING.
EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")
UNKNOWN_KEY_OID = bytes.fromhex("06072a8648ce3d0209")
P256_OID = bytes.fromhex("06082a8648ce3d030107")


async def _refused_then_valid(  # type: ignore[no-untyped-def]
    tmp_path: Path, media_type: str, chain=None, leaf=None
):
    """An envelope of a P-256 notary over the image whose x5c is ``chain`` (or its own
    chain with the leaf's DER passed through ``leaf``): the reason it is refused, and the
    result of verifying with a valid signature listed after it."""
    notary = TestNotary(curve=ec.SECP256R1())
    registry, image, verifier, subject = setup(tmp_path, notary)
    target = descriptor_of(image.manifest, image.media_type)
    if chain is None:
        first, *rest = notary._chain()
        chain = [leaf(first), *rest]
    if media_type == JWS:
        doc = json.loads(notary.jws(target))
        doc["header"]["x5c"] = [base64.b64encode(d).decode() for d in chain]
        envelope = json.dumps(doc).encode()
    else:
        protected_raw, _, payload, raw_signature = cbor2.loads(notary.cose(target)).value
        envelope = cbor2.dumps(
            cbor2.CBORTag(18, [protected_raw, {33: chain}, payload, raw_signature])
        )
    reason = verifier.check_envelope(media_type, envelope, subject, verifier._statements[0])
    registry.add(signature_artifact(envelope, media_type, target))
    valid = notary.jws(target) if media_type == JWS else notary.cose(target)
    registry.add(signature_artifact(valid, media_type, target))
    return reason, await verifier.verify(subject, registry, Limits())


def _flip_point(der: bytes) -> bytes:
    # A bit of the point's x coordinate: past the BIT STRING's tag, length, 0 and 0x04.
    at = der.index(P256_OID) + len(P256_OID) + 8
    return der[:at] + bytes([der[at] ^ 1]) + der[at + 1 :]


@pytest.mark.parametrize("media_type", [JWS, COSE])
@pytest.mark.parametrize(
    "leaf",
    [lambda der: der.replace(EC_KEY_OID, UNKNOWN_KEY_OID), _flip_point],
    ids=["unknown key algorithm", "point off its curve"],
)
async def test_refuses_signing_certificate_whose_key_cannot_be_loaded(
    tmp_path: Path, media_type: str, leaf
) -> None:  # type: ignore[no-untyped-def]
    """cryptography raised UnsupportedAlgorithm or ValueError from the leaf's public_key(),
    which escaped verify(): the envelope was no refusal, and a valid signature listed
    after it was never checked."""
    reason, result = await _refused_then_valid(tmp_path, media_type, leaf=leaf)
    assert reason is not None and "public key cannot be loaded" in reason, reason
    assert result.ok, result.reason


@pytest.mark.parametrize("entry", [2**62, 2**63])
async def test_refuses_cose_certificate_chain_entry_that_is_not_a_byte_string(
    tmp_path: Path, entry: int
) -> None:
    """x5chain (label 33) holds bstrs: an integer was turned into bytes(entry), a
    MemoryError or OverflowError that escaped verify() (and masked a valid signature)."""
    reason, result = await _refused_then_valid(tmp_path, COSE, chain=[entry])
    assert reason is not None and "certificate chain does not parse" in reason, reason
    assert result.ok, result.reason


@pytest.mark.parametrize("media_type", [JWS, COSE])
async def test_refuses_signing_certificate_whose_subject_cannot_be_parsed(
    tmp_path: Path, media_type: str
) -> None:
    """A leaf whose subject CN is a UTF8String of invalid UTF-8: cryptography loads the
    certificate but raises ValueError when its subject is read. Refused while a failed
    chain check returned first; since the identity check runs whatever the chain's
    outcome, it escaped verify() (and masked a valid signature listed after it)."""
    cn = b"\x0c\x0erelease signer"  # the subject's CN; the issuer's is "... root"
    reason, result = await _refused_then_valid(
        tmp_path, media_type, leaf=lambda der: der.replace(cn, cn[:2] + b"\xff" * 14, 1)
    )
    assert reason is not None and "certificate chain does not parse" in reason, reason
    assert result.ok, result.reason
