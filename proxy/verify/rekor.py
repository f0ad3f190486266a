"""Offline Rekor checks, done by sigstore-python: SETs, inclusion proofs, checkpoints.

Everything here is verified with the log keys of a ``trusted_root.json``; nothing is
fetched from a log. A log entry is sigstore-models' ``TransparencyLogEntry`` and
sigstore-python checks it, with the one key of the log the entry names:

* the signed entry timestamp (SET): ``TransparencyLogEntry._verify_set``;
* the RFC 6962 inclusion proof: ``sigstore._internal.merkle.verify_merkle_inclusion``;
* the checkpoint (a signed note): ``sigstore._internal.rekor.checkpoint.SignedCheckpoint``.

These are internal to sigstore-python: they are what its own ``Verifier`` runs on every
certificate bundle (``TransparencyLogEntry._verify``), called here one by one because
pullgate also verifies log entries that ``Verifier`` does not accept (public-key
bundles, cosign's legacy annotation, entries with a SET and no proof).

What pullgate adds, because sigstore-python's verifier does not ask it of these entries:

* the log must be in the trusted root under the entry's log ID and valid at the
  integration time (sigstore-python's keyring tries every log key for an unknown ID);
* the checkpoint must sign the proof's tree size as well as its root hash;
* a valid SET only proves that *some* entry was logged: the body (parsed by
  sigstore-rekor-types) must be bound to the signature being verified: its artifact
  hash, its signature bytes and its key or certificate (CVE-2022-23649,
  CVE-2026-22703, CVE-2022-36056). sigstore-python's binding checks compare against a
  bundle's certificate and cannot name a bare key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import rekor_types
from cryptography import x509
from pydantic import ValidationError
from sigstore._internal.merkle import verify_merkle_inclusion
from sigstore._internal.rekor.checkpoint import SignedCheckpoint
from sigstore._utils import KeyID
from sigstore.errors import VerificationError
from sigstore.models import TransparencyLogEntry
from sigstore_models.rekor import v1 as rekor_v1

from proxy.verify.base import SignatureError, first_line, json_object
from proxy.verify.keys import (
    KeyFormatError,
    VerificationKey,
    b64_field,
    load_certificates_pem,
    load_public_key_pem,
)
from proxy.verify.sigstore_trust import LogKey, SigstoreTrustRoot, valid_at

MAX_ENTRY_BODY_BYTES = 256 * 1024
MAX_CHECKPOINT_CHARS = 16 * 1024
MAX_ENTRY_SIGNATURES = 16

_Body = TypeVar("_Body", rekor_types.Hashedrekord, rekor_types.Dsse)


class LogEntry(rekor_v1.TransparencyLogEntry):
    """sigstore-models' log entry, with the inclusion proof optional.

    sigstore-models requires a proof; bundles v0.1 and cosign's legacy annotation may
    carry only a SET. Which of the two must be present is decided by ``verify_entry``.
    """

    inclusion_proof: rekor_v1.InclusionProof | None = None  # type: ignore[assignment]

    @property
    def integrated_at(self) -> datetime:
        return datetime.fromtimestamp(self.integrated_time or 0, tz=UTC)


def sigstore_entry(entry: LogEntry) -> TransparencyLogEntry:
    """sigstore-python's wrapper around ``entry``, for its checks.

    Its constructor refuses an entry without an inclusion proof; the checks themselves
    read only ``_inner`` and ask for what each needs.
    """
    wrapped = object.__new__(TransparencyLogEntry)
    wrapped._inner = entry
    return wrapped


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        error = exc.errors()[0]
        return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"[:200]
    return first_line(exc)


def parse_bundle_entry(raw: Any) -> LogEntry:
    """A bundle's ``tlogEntries`` item (protobuf JSON), read by sigstore-models."""
    try:
        return LogEntry.model_validate(raw)
    except ValidationError as exc:
        raise SignatureError(f"bundle tlog entry is malformed: {_reason(exc)}") from exc


def parse_int(value: Any, *, what: str) -> int:
    # cosign's annotation writes numbers; protobuf JSON (int64) writes strings.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        return int(value)
    raise SignatureError(f"{what} is not an integer")


def parse_legacy_bundle(annotation: str) -> LogEntry:
    """Parse cosign's ``dev.sigstore.cosign/bundle`` annotation (the SET and its payload).

    Hand-written: sigstore-python reads log entries only as protobuf JSON (bundles) or
    as a log's API response with an inclusion proof. cosign's annotation is neither:
    ``{"SignedEntryTimestamp", "Payload": {body, integratedTime, logIndex, logID}}``
    with numbers as JSON numbers and the log ID in hex. It is mapped here onto the
    same entry type, so that sigstore-python checks its SET like any other.
    """
    try:
        doc = json.loads(annotation)
    except (ValueError, RecursionError) as exc:
        raise SignatureError("Rekor bundle annotation is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("Payload"), dict):
        raise SignatureError("Rekor bundle annotation has no Payload")
    payload = doc["Payload"]
    body = b64_field(payload.get("body"), what="Rekor entry body")
    if len(body) > MAX_ENTRY_BODY_BYTES:
        raise SignatureError("Rekor entry body is too large")
    log_id_hex = payload.get("logID")
    if not isinstance(log_id_hex, str) or not re.fullmatch(r"[0-9a-f]{64}", log_id_hex):
        raise SignatureError("Rekor logID is not 64 hex characters")
    integrated_time = parse_int(payload.get("integratedTime"), what="Rekor integratedTime")
    log_index = parse_int(payload.get("logIndex"), what="Rekor logIndex")
    signed_entry_timestamp = b64_field(doc.get("SignedEntryTimestamp"), what="Rekor SET")
    try:
        return LogEntry.model_validate(
            {
                "logIndex": str(log_index),
                "logId": {"keyId": base64.b64encode(bytes.fromhex(log_id_hex)).decode()},
                # Not covered by the SET, as in a bundle: the body is what is checked.
                "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
                "integratedTime": str(integrated_time),
                "inclusionPromise": {
                    "signedEntryTimestamp": base64.b64encode(signed_entry_timestamp).decode()
                },
                "canonicalizedBody": base64.b64encode(body).decode(),
            }
        )
    except ValidationError as exc:
        raise SignatureError(f"Rekor bundle annotation is malformed: {_reason(exc)}") from exc


# ---- the log's signatures (sigstore-python) -----------------------------------------


def find_log(trust: SigstoreTrustRoot, entry: LogEntry) -> LogKey:
    """The trusted log the entry names, valid at the entry's integration time."""
    log_id = entry.log_id.key_id
    log = trust.tlog(log_id)
    if log is None:
        raise SignatureError(f"Rekor log {log_id.hex()[:16]}… is not in the trusted root")
    if not valid_at(log.valid_for, entry.integrated_at):
        raise SignatureError("Rekor log key was not valid at the entry's integration time")
    return log


def verify_entry(trust: SigstoreTrustRoot, entry: LogEntry) -> LogKey:
    """Check the entry's SET and inclusion proof, whichever it has (one at least)."""
    if entry.inclusion_promise is None and entry.inclusion_proof is None:
        raise SignatureError("tlog entry has neither an inclusion promise nor a proof")
    log = find_log(trust, entry) if entry.inclusion_promise is None else verify_set(trust, entry)
    if entry.inclusion_proof is not None:
        verify_inclusion(log, entry)
    return log


def verify_set(trust: SigstoreTrustRoot, entry: LogEntry) -> LogKey:
    """Check the SET with the trusted log key for the entry's log ID; return that log."""
    if entry.inclusion_promise is None:
        raise SignatureError("Rekor entry has no signed entry timestamp")
    log = find_log(trust, entry)
    try:
        sigstore_entry(entry)._verify_set(log.keyring)
    except (VerificationError, ValueError) as exc:
        raise SignatureError(
            "Rekor SET signature does not verify with the trusted log key"
        ) from exc
    return log


def verify_inclusion(log: LogKey, entry: LogEntry) -> None:
    """Check that the entry body is in the tree whose root the log signed in a checkpoint."""
    proof = entry.inclusion_proof
    if proof is None:
        raise SignatureError("Rekor entry has no inclusion proof")
    try:
        verify_merkle_inclusion(sigstore_entry(entry))
    except VerificationError as exc:
        raise SignatureError(
            f"inclusion proof does not lead to its root hash ({_reason(exc)[:80]})"
        ) from exc
    if proof.checkpoint is None:
        raise SignatureError("inclusion proof has no checkpoint")
    size, signed_root = verify_checkpoint(log, proof.checkpoint.envelope)
    if signed_root != proof.root_hash or size != proof.tree_size:
        raise SignatureError("checkpoint does not sign the inclusion proof's root")


def verify_checkpoint(log: LogKey, checkpoint: str) -> tuple[int, bytes]:
    """Verify a signed-note checkpoint with the log key; return (tree size, root hash)."""
    if len(checkpoint) > MAX_CHECKPOINT_CHARS:
        raise SignatureError("checkpoint is malformed: too long")
    try:
        signed = SignedCheckpoint.from_text(checkpoint)
        root = bytes.fromhex(signed.checkpoint.log_hash)
    except (VerificationError, ValueError) as exc:
        raise SignatureError(f"checkpoint is malformed: {_reason(exc)}") from exc
    try:
        signed.signed_note.verify(log.keyring, KeyID(log.log_id))
    except (VerificationError, ValueError) as exc:
        raise SignatureError("checkpoint is not signed by the trusted log key") from exc
    return signed.checkpoint.log_size, root


# ---- binding the entry to the signature (pullgate) ----------------------------------


@dataclass(frozen=True, slots=True)
class SignerIdentity:
    """What the log entry must name as the signer: a key or a certificate."""

    key: VerificationKey
    certificate: x509.Certificate | None = None


def check_hashedrekord_binding(
    entry: LogEntry,
    *,
    digest_hex: str,
    signature: bytes,
    signer: SignerIdentity,
) -> None:
    """Require a ``hashedrekord`` 0.0.1 body over exactly this hash, signature and signer."""
    spec = _body(entry, rekor_types.Hashedrekord).spec.root
    data_hash = spec.data.hash
    if data_hash is None or data_hash.algorithm != "sha256" or data_hash.value != digest_hex:
        raise SignatureError("Rekor entry is for another artifact hash (not bound to payload)")
    if b64_field(spec.signature.content, what="Rekor entry signature") != signature:
        raise SignatureError("Rekor entry is for another signature (not bound to signature)")
    if spec.signature.public_key is None:
        raise SignatureError("Rekor entry has no public key")
    logged = b64_field(spec.signature.public_key.content, what="Rekor entry public key")
    _check_signer(logged, signer)


def check_dsse_binding(
    entry: LogEntry,
    *,
    payload: bytes,
    signature: bytes,
    signer: SignerIdentity,
) -> None:
    """Require a ``dsse`` 0.0.1 body for this payload, listing this signature and signer.

    The v0.0.1 body also hashes the envelope, which is not canonical JSON: not checked.
    """
    spec = _body(entry, rekor_types.Dsse).spec.root
    payload_hash = spec.payload_hash
    if payload_hash is None or (
        payload_hash.algorithm != "sha256"
        or payload_hash.value != hashlib.sha256(payload).hexdigest()
    ):
        raise SignatureError("Rekor entry is for another DSSE payload (not bound to payload)")
    for item in (spec.signatures or [])[:MAX_ENTRY_SIGNATURES]:
        if b64_field(item.signature, what="Rekor entry signature") == signature:
            _check_signer(b64_field(item.verifier, what="Rekor entry verifier"), signer)
            return
    raise SignatureError("Rekor entry is for another signature (not bound to signature)")


def _body(entry: LogEntry, model: type[_Body]) -> _Body:
    """The entry body as a sigstore-rekor-types model of kind ``model``, version 0.0.1."""
    doc = json_object(entry.canonicalized_body, "Rekor entry body")
    kind = model.model_fields["kind"].default
    if doc.get("kind") != kind or doc.get("apiVersion") != "0.0.1":
        raise SignatureError(
            f"unsupported Rekor entry kind {doc.get('kind')!r} {doc.get('apiVersion')!r}"
        )
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise SignatureError(f"Rekor {kind} entry is malformed: {_reason(exc)}") from exc


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
