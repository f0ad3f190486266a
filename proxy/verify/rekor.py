"""Offline Rekor checks: signed entry timestamps (SETs), entry binding, inclusion proofs.

Everything here is verified with the log keys of a ``trusted_root.json``; nothing is
fetched from a log.

* A SET is the log's ECDSA signature over the canonical JSON (keys sorted, no spaces)
  of ``{"body", "integratedTime", "logID", "logIndex"}``, where ``body`` is the base64 of
  the entry and ``logID`` the hex sha256 of the log's DER public key.
* A valid SET only proves that *some* entry was logged. The entry body must also be
  bound to the signature being verified: its artifact hash, its signature bytes and its
  key or certificate (CVE-2022-23649, CVE-2026-22703, CVE-2022-36056).
* An inclusion proof is an RFC 6962 audit path to a root hash, and that root is
  signed by the log in a checkpoint (a signed note).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from proxy.verify.base import SignatureError
from proxy.verify.keys import (
    KeyFormatError,
    VerificationKey,
    b64decode_strict,
    load_certificates_pem,
    load_public_key_pem,
)
from proxy.verify.sigstore_trust import LogKey, SigstoreTrustRoot

MAX_ENTRY_BODY_BYTES = 256 * 1024
MAX_PROOF_HASHES = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class RekorEntry:
    """A log entry as carried next to a signature (legacy annotation or bundle)."""

    body: bytes
    integrated_time: int
    log_index: int
    log_id: bytes
    signed_entry_timestamp: bytes | None

    @property
    def integrated_at(self) -> datetime:
        return datetime.fromtimestamp(self.integrated_time, tz=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class InclusionProof:
    log_index: int
    tree_size: int
    root_hash: bytes
    hashes: tuple[bytes, ...]
    checkpoint: str


def parse_int(value: Any, *, what: str) -> int:
    # Protobuf JSON encodes int64 as strings; cosign's annotation uses numbers.
    if isinstance(value, bool):
        raise SignatureError(f"{what} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        return int(value)
    raise SignatureError(f"{what} is not an integer")


def _b64(value: Any, *, what: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"{what} is missing")
    try:
        return b64decode_strict(value, what=what)
    except KeyFormatError as exc:
        raise SignatureError(str(exc)) from exc


def parse_legacy_bundle(annotation: str) -> RekorEntry:
    """Parse cosign's ``dev.sigstore.cosign/bundle`` annotation (the SET and its payload)."""
    try:
        doc = json.loads(annotation)
    except (ValueError, RecursionError) as exc:
        raise SignatureError("Rekor bundle annotation is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("Payload"), dict):
        raise SignatureError("Rekor bundle annotation has no Payload")
    payload = doc["Payload"]
    body = _b64(payload.get("body"), what="Rekor entry body")
    if len(body) > MAX_ENTRY_BODY_BYTES:
        raise SignatureError("Rekor entry body is too large")
    log_id_hex = payload.get("logID")
    if not isinstance(log_id_hex, str) or not re.fullmatch(r"[0-9a-f]{64}", log_id_hex):
        raise SignatureError("Rekor logID is not 64 hex characters")
    return RekorEntry(
        body=body,
        integrated_time=parse_int(payload.get("integratedTime"), what="Rekor integratedTime"),
        log_index=parse_int(payload.get("logIndex"), what="Rekor logIndex"),
        log_id=bytes.fromhex(log_id_hex),
        signed_entry_timestamp=_b64(doc.get("SignedEntryTimestamp"), what="Rekor SET"),
    )


def set_payload(entry: RekorEntry) -> bytes:
    """The canonical JSON the log signs in a SET."""
    doc = {
        "body": base64.b64encode(entry.body).decode(),
        "integratedTime": entry.integrated_time,
        "logID": entry.log_id.hex(),
        "logIndex": entry.log_index,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def find_log(trust: SigstoreTrustRoot, entry: RekorEntry) -> LogKey:
    """The trusted log the entry names, valid at the entry's integration time."""
    log = trust.tlog(entry.log_id)
    if log is None:
        raise SignatureError(f"Rekor log {entry.log_id.hex()[:16]}… is not in the trusted root")
    if not log.valid_for.contains(entry.integrated_at):
        raise SignatureError("Rekor log key was not valid at the entry's integration time")
    return log


def verify_set(trust: SigstoreTrustRoot, entry: RekorEntry) -> LogKey:
    """Check the SET with the trusted log key for ``entry.log_id``; return that log."""
    if entry.signed_entry_timestamp is None:
        raise SignatureError("Rekor entry has no signed entry timestamp")
    log = find_log(trust, entry)
    if not log.key.verify(entry.signed_entry_timestamp, set_payload(entry)):
        raise SignatureError("Rekor SET signature does not verify with the trusted log key")
    return log


@dataclass(frozen=True, slots=True)
class SignerIdentity:
    """What the log entry must name as the signer: a key or a certificate."""

    key: VerificationKey
    certificate: x509.Certificate | None = None


def check_hashedrekord_binding(
    entry: RekorEntry,
    *,
    digest_hex: str,
    signature: bytes,
    signer: SignerIdentity,
) -> None:
    """Require a ``hashedrekord`` 0.0.1 body over exactly this hash, signature and signer."""
    doc = _body(entry)
    if doc.get("kind") != "hashedrekord" or doc.get("apiVersion") != "0.0.1":
        raise SignatureError(
            f"unsupported Rekor entry kind {doc.get('kind')!r} {doc.get('apiVersion')!r}"
        )
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise SignatureError("Rekor entry has no spec")
    data_hash = ((spec.get("data") or {}).get("hash")) or {}
    if not isinstance(data_hash, dict):
        raise SignatureError("Rekor entry has no data hash")
    if data_hash.get("algorithm") != "sha256" or data_hash.get("value") != digest_hex:
        raise SignatureError("Rekor entry is for another artifact hash (not bound to payload)")
    sig = spec.get("signature")
    if not isinstance(sig, dict):
        raise SignatureError("Rekor entry has no signature")
    if _b64(sig.get("content"), what="Rekor entry signature") != signature:
        raise SignatureError("Rekor entry is for another signature (not bound to signature)")
    public_key = sig.get("publicKey")
    if not isinstance(public_key, dict):
        raise SignatureError("Rekor entry has no public key")
    _check_signer(_b64(public_key.get("content"), what="Rekor entry public key"), signer)


def check_dsse_binding(
    entry: RekorEntry,
    *,
    payload: bytes,
    pae: bytes,
    signature: bytes,
    signer: SignerIdentity,
) -> None:
    """Require a ``dsse`` 0.0.1 body for this payload, listing this signature and signer."""
    del pae  # the v0.0.1 body hashes the payload; the envelope hash is not canonical
    doc = _body(entry)
    if doc.get("kind") != "dsse" or doc.get("apiVersion") != "0.0.1":
        raise SignatureError(
            f"unsupported Rekor entry kind {doc.get('kind')!r} {doc.get('apiVersion')!r}"
        )
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise SignatureError("Rekor entry has no spec")
    payload_hash = spec.get("payloadHash")
    if not isinstance(payload_hash, dict) or (
        payload_hash.get("algorithm") != "sha256"
        or payload_hash.get("value") != hashlib.sha256(payload).hexdigest()
    ):
        raise SignatureError("Rekor entry is for another DSSE payload (not bound to payload)")
    signatures = spec.get("signatures")
    if not isinstance(signatures, list):
        raise SignatureError("Rekor entry has no signatures")
    for item in signatures[:16]:
        if not isinstance(item, dict):
            continue
        if _b64(item.get("signature"), what="Rekor entry signature") != signature:
            continue
        _check_signer(_b64(item.get("verifier"), what="Rekor entry verifier"), signer)
        return
    raise SignatureError("Rekor entry is for another signature (not bound to signature)")


def _body(entry: RekorEntry) -> dict[str, Any]:
    try:
        doc = json.loads(entry.body)
    except (ValueError, RecursionError) as exc:
        raise SignatureError("Rekor entry body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise SignatureError("Rekor entry body is not a JSON object")
    return doc


def _check_signer(pem: bytes, signer: SignerIdentity) -> None:
    try:
        if b"BEGIN CERTIFICATE" in pem:
            logged_cert = load_certificates_pem(pem, max_count=1)[0]
            if signer.certificate is None:
                raise SignatureError("Rekor entry names a certificate, the signature a key")
            if logged_cert != signer.certificate:
                raise SignatureError("Rekor entry names another certificate")
            return
        logged_key = load_public_key_pem(pem)
    except KeyFormatError as exc:
        raise SignatureError(f"Rekor entry public key: {exc}") from exc
    if signer.certificate is not None:
        # A keyless signature must be logged with its certificate, not a bare key.
        raise SignatureError("Rekor entry names a bare key, the signature a certificate")
    if logged_key.spki_der != signer.key.spki_der:
        raise SignatureError("Rekor entry names another public key")


# ---- inclusion proofs (RFC 6962 / RFC 9162 section 2.1.3.2) -------------------------


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion_proof(
    index: int, tree_size: int, leaf: bytes, proof: tuple[bytes, ...]
) -> bytes:
    """Recompute the tree root from a leaf hash and its audit path."""
    if not 0 <= index < tree_size:
        raise SignatureError("inclusion proof index is outside the tree")
    if len(proof) > MAX_PROOF_HASHES or any(len(h) != 32 for h in proof):
        raise SignatureError("inclusion proof hashes are malformed")
    fn, sn = index, tree_size - 1
    result = leaf
    for sibling in proof:
        if sn == 0:
            raise SignatureError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            result = _node_hash(sibling, result)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            result = _node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise SignatureError("inclusion proof is shorter than the tree is deep")
    return result


def verify_checkpoint(log: LogKey, checkpoint: str) -> tuple[int, bytes]:
    """Verify a signed-note checkpoint with the log key; return (tree size, root hash)."""
    if len(checkpoint) > 16 * 1024 or checkpoint.count("\n\n") != 1:
        raise SignatureError("checkpoint is malformed")
    note, signatures = checkpoint.split("\n\n", 1)
    note += "\n"
    lines = note.split("\n")
    if len(lines) < 4 or not lines[0]:
        raise SignatureError("checkpoint note is malformed")
    try:
        size = int(lines[1])
    except ValueError as exc:
        raise SignatureError("checkpoint tree size is not a number") from exc
    root = _b64(lines[2], what="checkpoint root hash")
    for name_sig in re.findall(r"\u2014 (\S+) (\S+)\n", signatures):
        raw = _b64(name_sig[1], what="checkpoint signature")
        if len(raw) > 4 and raw[:4] == log.log_id[:4] and log.key.verify(raw[4:], note.encode()):
            return size, root
    raise SignatureError("checkpoint is not signed by the trusted log key")


def verify_inclusion(log: LogKey, entry: RekorEntry, proof: InclusionProof) -> None:
    """Check that ``entry.body`` is in the tree whose root the log signed in a checkpoint."""
    root = root_from_inclusion_proof(
        proof.log_index, proof.tree_size, leaf_hash(entry.body), proof.hashes
    )
    if root != proof.root_hash:
        raise SignatureError("inclusion proof does not lead to its root hash")
    size, signed_root = verify_checkpoint(log, proof.checkpoint)
    if signed_root != proof.root_hash or size != proof.tree_size:
        raise SignatureError("checkpoint does not sign the inclusion proof's root")
