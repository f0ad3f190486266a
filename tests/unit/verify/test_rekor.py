"""Offline Rekor checks: SETs, entry binding, RFC 6962 inclusion proofs, checkpoints."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.verify.base import SignatureError
from proxy.verify.keys import load_certificates_pem, load_public_key_pem
from proxy.verify.rekor import (
    InclusionProof,
    RekorEntry,
    SignerIdentity,
    check_hashedrekord_binding,
    leaf_hash,
    parse_legacy_bundle,
    root_from_inclusion_proof,
    set_payload,
    verify_checkpoint,
    verify_inclusion,
    verify_set,
)
from proxy.verify.sigstore_trust import load_trusted_root
from tests.support.cosign_sign import TestSigstore, _audit_path, _mth, generate_key

FIX = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "vectors"
    / "containers-image"
    / "signature"
    / "fixtures"
)


@pytest.fixture(scope="module")
def sigstore() -> TestSigstore:
    return TestSigstore()


@pytest.fixture
def trust(sigstore: TestSigstore, tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_trusted_root(sigstore.write_trusted_root(tmp_path / "root.json"))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=1, max_value=70), data=st.data())
def test_inclusion_proofs_round_trip(size: int, data: st.DataObject) -> None:
    leaves = [f"leaf-{i}".encode() for i in range(size)]
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = tuple(_audit_path(index, leaves))
    assert root_from_inclusion_proof(index, size, leaf_hash(leaves[index]), proof) == _mth(leaves)
    if proof:
        bad = (bytes(32), *proof[1:])
        assert root_from_inclusion_proof(index, size, leaf_hash(leaves[index]), bad) != _mth(leaves)


@pytest.mark.parametrize(
    ("index", "size", "proof", "why"),
    [
        (5, 5, (), "outside the tree"),
        (-1, 5, (), "outside the tree"),
        (0, 4, (bytes(32),), "shorter than the tree"),
        (0, 1, (bytes(32),), "longer than the tree"),
        (0, 2, (b"short",), "malformed"),
        (0, 2, (bytes(32),) * 65, "malformed"),
    ],
)
def test_refuses_malformed_inclusion_proofs(
    index: int, size: int, proof: tuple[bytes, ...], why: str
) -> None:
    with pytest.raises(SignatureError, match=why):
        root_from_inclusion_proof(index, size, leaf_hash(b"x"), proof)


def _entry_and_proof(sigstore: TestSigstore, body: bytes = b'{"kind":"x"}'):  # type: ignore[no-untyped-def]
    from proxy.verify.bundle import _tlog_entry

    return _tlog_entry(sigstore.tlog_entry(body, kind="hashedrekord"))


def test_inclusion_proof_with_checkpoint_verifies(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    log = trust.tlog(entry.log_id)
    verify_inclusion(log, entry, proof)
    verify_set(trust, entry)


def test_refuses_inclusion_proof_for_other_body(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    other = RekorEntry(
        body=b"other",
        integrated_time=entry.integrated_time,
        log_index=entry.log_index,
        log_id=entry.log_id,
        signed_entry_timestamp=None,
    )
    with pytest.raises(SignatureError, match="does not lead to its root"):
        verify_inclusion(trust.tlog(entry.log_id), other, proof)


def test_refuses_checkpoint_signed_by_other_log(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    forged = TestSigstore().checkpoint(proof.tree_size, proof.root_hash)
    with pytest.raises(SignatureError, match="not signed by the trusted log key"):
        verify_checkpoint(trust.tlog(entry.log_id), forged)


def test_refuses_checkpoint_for_other_root(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    swapped = InclusionProof(
        log_index=proof.log_index,
        tree_size=proof.tree_size,
        root_hash=proof.root_hash,
        hashes=proof.hashes,
        checkpoint=sigstore.checkpoint(proof.tree_size, bytes(32)),
    )
    with pytest.raises(SignatureError, match="checkpoint does not sign"):
        verify_inclusion(trust.tlog(entry.log_id), entry, swapped)


@pytest.mark.parametrize(
    "checkpoint", ["", "no blank line", "a\n\nb\n\nc", "origin\nNaN\nAAAA\n\n\u2014 x AAAA\n"]
)
def test_malformed_checkpoints_fail_cleanly(sigstore: TestSigstore, trust, checkpoint: str) -> None:  # type: ignore[no-untyped-def]
    log = trust.tlogs[0]
    with pytest.raises(SignatureError):
        verify_checkpoint(log, checkpoint)


def test_set_payload_is_canonical(sigstore: TestSigstore) -> None:
    entry = RekorEntry(
        body=b"{}", integrated_time=5, log_index=7, log_id=bytes(32), signed_entry_timestamp=None
    )
    assert set_payload(entry) == (
        b'{"body":"e30=","integratedTime":5,"logID":"' + b"00" * 32 + b'","logIndex":7}'
    )


@pytest.mark.parametrize(
    ("annotation", "why"),
    [
        ("[]", "no Payload"),
        (
            '{"Payload": {"body": "e30=", "logID": "' + "ab" * 32 + '", "integratedTime": "x"}}',
            "integratedTime",
        ),
        (
            '{"Payload": {"body": "e30=", "logID": "'
            + "ab" * 32
            + '", "integratedTime": 1, "logIndex": true}}',
            "logIndex",
        ),
        (
            '{"Payload": {"body": "e30=", "logID": "'
            + "ab" * 32
            + '", "integratedTime": 1, "logIndex": 1}, "SignedEntryTimestamp": 7}',
            "SET",
        ),
    ],
)
def test_malformed_legacy_bundles_fail_cleanly(annotation: str, why: str) -> None:
    with pytest.raises(SignatureError, match=why):
        parse_legacy_bundle(annotation)


def test_refuses_entry_naming_bare_key_for_certificate_signature(sigstore: TestSigstore) -> None:
    signer = generate_key()
    cert = sigstore.issue_certificate(signer)
    key = load_public_key_pem(signer.public_pem)
    body = sigstore.hashedrekord_body(
        digest_hex="ab" * 32, signature=b"sig", signer_pem=signer.public_pem
    )
    entry = RekorEntry(
        body=body, integrated_time=1, log_index=1, log_id=bytes(32), signed_entry_timestamp=None
    )
    with pytest.raises(SignatureError, match="bare key"):
        check_hashedrekord_binding(
            entry, digest_hex="ab" * 32, signature=b"sig", signer=SignerIdentity(key, cert)
        )
    check_hashedrekord_binding(
        entry, digest_hex="ab" * 32, signature=b"sig", signer=SignerIdentity(key)
    )


def test_refuses_entry_of_other_kind(sigstore: TestSigstore) -> None:
    body = json.dumps({"kind": "intoto", "apiVersion": "0.0.2", "spec": {}}).encode()
    entry = RekorEntry(
        body=body, integrated_time=1, log_index=1, log_id=bytes(32), signed_entry_timestamp=None
    )
    key = load_public_key_pem(generate_key().public_pem)
    with pytest.raises(SignatureError, match="unsupported Rekor entry kind 'intoto'"):
        check_hashedrekord_binding(
            entry, digest_hex="ab" * 32, signature=b"s", signer=SignerIdentity(key)
        )


@pytest.mark.skipif(not FIX.is_dir(), reason=f"signature vectors not found at {FIX}")
def test_real_set_refuses_other_certificate() -> None:
    """The public-good entry names the fulcio-cert leaf; another certificate is refused."""
    import hashlib

    entry = parse_legacy_bundle((FIX / "rekor-set").read_text())
    payload = (FIX / "rekor-payload").read_bytes()
    signature = base64.b64decode((FIX / "rekor-sig").read_bytes())
    other = load_certificates_pem((FIX / "pki-cert").read_bytes())[0]
    key = load_public_key_pem(generate_key().public_pem)
    with pytest.raises(SignatureError, match="another certificate"):
        check_hashedrekord_binding(
            entry,
            digest_hex=hashlib.sha256(payload).hexdigest(),
            signature=signature,
            signer=SignerIdentity(key, other),
        )
