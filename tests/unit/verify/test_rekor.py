"""Offline Rekor checks: SETs, entry binding, RFC 6962 inclusion proofs, checkpoints."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sigstore_models.rekor.v1 import Checkpoint

from proxy.verify.base import SignatureError
from proxy.verify.keys import load_certificates_pem, load_public_key_pem
from proxy.verify.rekor import (
    LogEntry,
    SignerIdentity,
    check_hashedrekord_binding,
    parse_bundle_entry,
    parse_legacy_bundle,
    sigstore_entry,
    verify_checkpoint,
    verify_inclusion,
    verify_set,
)
from proxy.verify.sigstore_trust import SigstoreTrustRoot, load_trusted_root
from tests.support.cosign_sign import TestSigstore, _audit_path, _b64, _mth, generate_key

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


@pytest.fixture(scope="module")
def module_trust(sigstore: TestSigstore, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return load_trusted_root(sigstore.write_trusted_root(tmp_path_factory.mktemp("t") / "r.json"))


def _proved_entry(
    sigstore: TestSigstore,
    body: bytes,
    *,
    index: int,
    size: int,
    proof: tuple[bytes, ...],
    root: bytes,
) -> LogEntry:
    """A bundle entry for ``body`` at ``index`` with this audit path and a signed root."""
    return parse_bundle_entry(
        {
            "logIndex": "1",
            "logId": {"keyId": _b64(sigstore.log_id)},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": str(int(sigstore.epoch.timestamp()) + 1),
            "canonicalizedBody": _b64(body),
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": _b64(root),
                "treeSize": str(size),
                "hashes": [_b64(h) for h in proof],
                "checkpoint": {"envelope": sigstore.checkpoint(size, root)},
            },
        }
    )


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=1, max_value=70), data=st.data())
def test_inclusion_proofs_round_trip(
    sigstore: TestSigstore,
    module_trust: SigstoreTrustRoot,
    size: int,
    data: st.DataObject,
) -> None:
    leaves = [f"leaf-{i}".encode() for i in range(size)]
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = tuple(_audit_path(index, leaves))
    log = module_trust.tlogs[0]
    good = _proved_entry(
        sigstore, leaves[index], index=index, size=size, proof=proof, root=_mth(leaves)
    )
    verify_inclusion(log, good)
    if proof:
        bad = (bytes(32), *proof[1:])
        forged = _proved_entry(
            sigstore, leaves[index], index=index, size=size, proof=bad, root=_mth(leaves)
        )
        with pytest.raises(SignatureError, match="does not lead to its root hash"):
            verify_inclusion(log, forged)


@pytest.mark.parametrize(
    ("index", "size", "proof", "why"),
    [
        (5, 5, (), "logIndex 5 must be less than treeSize 5"),
        (-1, 5, (), "exceeds uint64 domain"),
        (0, 4, (bytes(32),), "wrong size: expected 2, got 1"),
        (0, 1, (bytes(32),), "wrong size: expected 0, got 1"),
        (0, 2, (b"short",), "does not lead to its root hash"),
        (0, 2, (bytes(32),) * 65, "wrong size: expected 1, got 65"),
    ],
)
def test_refuses_malformed_inclusion_proofs(
    sigstore: TestSigstore,
    trust: SigstoreTrustRoot,
    index: int,
    size: int,
    proof: tuple[bytes, ...],
    why: str,
) -> None:
    with pytest.raises(SignatureError, match=why):
        entry = _proved_entry(sigstore, b"x", index=index, size=size, proof=proof, root=bytes(32))
        verify_inclusion(trust.tlogs[0], entry)


def _entry_and_proof(sigstore: TestSigstore, body: bytes = b'{"kind":"x"}'):  # type: ignore[no-untyped-def]
    entry = parse_bundle_entry(sigstore.tlog_entry(body, kind="hashedrekord"))
    return entry, entry.inclusion_proof


def _entry_with_body(body: bytes) -> LogEntry:
    return LogEntry.model_validate(
        {
            "logIndex": "1",
            "logId": {"keyId": _b64(bytes(32))},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": "1",
            "canonicalizedBody": _b64(body),
        }
    )


def test_inclusion_proof_with_checkpoint_verifies(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    log = trust.tlog(entry.log_id.key_id)
    verify_inclusion(log, entry)
    verify_set(trust, entry)


def test_refuses_inclusion_proof_for_other_body(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    other = entry.model_copy(update={"canonicalized_body": b"other", "inclusion_promise": None})
    with pytest.raises(SignatureError, match="does not lead to its root"):
        verify_inclusion(trust.tlog(entry.log_id.key_id), other)


def test_refuses_checkpoint_signed_by_other_log(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    forged = TestSigstore().checkpoint(proof.tree_size, proof.root_hash)
    with pytest.raises(SignatureError, match="not signed by the trusted log key"):
        verify_checkpoint(trust.tlog(entry.log_id.key_id), forged)


def test_refuses_checkpoint_for_other_root(sigstore: TestSigstore, trust) -> None:  # type: ignore[no-untyped-def]
    entry, proof = _entry_and_proof(sigstore)
    assert proof is not None
    checkpoint = Checkpoint(envelope=sigstore.checkpoint(proof.tree_size, bytes(32)))
    swapped = entry.model_copy(
        update={"inclusion_proof": proof.model_copy(update={"checkpoint": checkpoint})}
    )
    with pytest.raises(SignatureError, match="checkpoint does not sign"):
        verify_inclusion(trust.tlog(entry.log_id.key_id), swapped)


@pytest.mark.parametrize(
    "checkpoint", ["", "no blank line", "a\n\nb\n\nc", "origin\nNaN\nAAAA\n\n\u2014 x AAAA\n"]
)
def test_malformed_checkpoints_fail_cleanly(sigstore: TestSigstore, trust, checkpoint: str) -> None:  # type: ignore[no-untyped-def]
    log = trust.tlogs[0]
    with pytest.raises(SignatureError):
        verify_checkpoint(log, checkpoint)


def test_set_payload_is_canonical(sigstore: TestSigstore) -> None:
    annotation = {
        "SignedEntryTimestamp": "AA==",
        "Payload": {"body": "e30=", "integratedTime": 5, "logIndex": 7, "logID": "00" * 32},
    }
    entry = parse_legacy_bundle(json.dumps(annotation))
    assert sigstore_entry(entry)._encode_canonical() == (
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
    entry = _entry_with_body(body)
    with pytest.raises(SignatureError, match="bare key"):
        check_hashedrekord_binding(
            entry, digest_hex="ab" * 32, signature=b"sig", signer=SignerIdentity(key, cert)
        )
    check_hashedrekord_binding(
        entry, digest_hex="ab" * 32, signature=b"sig", signer=SignerIdentity(key)
    )


def test_refuses_entry_of_other_kind(sigstore: TestSigstore) -> None:
    body = json.dumps({"kind": "intoto", "apiVersion": "0.0.2", "spec": {}}).encode()
    entry = _entry_with_body(body)
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
