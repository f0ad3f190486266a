"""Sigstore bundles (v0.1-v0.3): the cosign ``--new-bundle-format`` signature over an image.

``verify_bundle`` checks one bundle against one artifact digest:

* certificate bundles go to sigstore-python's ``Verifier`` with the trusted root loaded
  from the policy's file (offline), with our identity policy (exact or regexp);
* public-key bundles are checked here: the message digest or the in-toto statement
  subject must be the artifact digest, the signature must verify with the policy key,
  and any transparency-log entry must be signed by a trusted log and bound to this
  signature.

For an image, the artifact is the manifest: ``messageDigest`` is the manifest digest,
and a DSSE statement must list that digest among its subjects. A DSSE statement is a
signature only with cosign's own predicate type (``cosign sign --new-bundle-format``);
any other is an attestation, which counts only where the policy names its type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sigstore.errors import Error as SigstoreError
from sigstore.errors import VerificationError
from sigstore.hashes import Hashed
from sigstore.models import Bundle
from sigstore_models.common.v1 import HashAlgorithm

from proxy.oci.digest import Digest
from proxy.verify.base import PolicyError, SignatureError, first_line, json_object
from proxy.verify.keys import VerificationKey, b64_field
from proxy.verify.rekor import (
    LogEntry,
    SignerIdentity,
    check_dsse_binding,
    check_hashedrekord_binding,
    parse_bundle_entry,
    verify_entry,
)
from proxy.verify.sigstore_trust import KeylessIdentity, SigstoreTrustRoot, check_identity

BUNDLE_MEDIA_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle.v0.3+json",
    }
)
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPES = frozenset(
    {"https://in-toto.io/Statement/v0.1", "https://in-toto.io/Statement/v1"}
)
COSIGN_SIGN_PREDICATE_TYPE = "https://sigstore.dev/cosign/sign/v1"
"""What ``cosign sign --new-bundle-format`` states about an image (cosign's
``types.CosignSignPredicateType``; ``cosign attest`` writes the attestation's own type)."""
MAX_DSSE_SIGNATURES = 8
MAX_TLOG_ENTRIES = 8
MAX_STATEMENT_SUBJECTS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CosignPolicy:
    """What a cosign requirement accepts: a key, or a keyless identity under a root."""

    key: VerificationKey | None = None
    identity: KeylessIdentity | None = None
    trust: SigstoreTrustRoot | None = None
    tlog_required: bool = False
    predicate_type: str | None = None
    sigstore_verifier: Any = None
    """A ``sigstore.verify.Verifier`` over ``trust``, built once when the policy loads."""

    def __post_init__(self) -> None:
        if (self.key is None) == (self.identity is None):
            raise PolicyError("a cosign requirement needs exactly one of key or keyless")
        if self.identity is not None and self.trust is None:
            raise PolicyError("keyless cosign verification needs trust.sigstoreTrustedRoot")
        if self.tlog_required and self.trust is None:
            raise PolicyError("tlog: required needs trust.sigstoreTrustedRoot (the Rekor keys)")


def sigstore_verifier_for(trust: SigstoreTrustRoot) -> Any:
    """sigstore-python's ``Verifier`` over the already-parsed trusted root (offline)."""
    from sigstore.verify import Verifier

    try:
        return Verifier(trusted_root=trust.sigstore)
    except Exception as exc:  # sigstore raises many types on a bad root; all mean "bad file"
        raise PolicyError(f"sigstore cannot use trusted root {trust.path}: {exc}") from exc


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SignatureError(f"bundle {what} is missing or not an object")
    return value


def _b64(value: Any, what: str) -> bytes:
    return b64_field(value, what=f"bundle {what}")


def verify_bundle(
    raw: bytes,
    *,
    artifact_digest: Digest,
    artifact: bytes | None,
    policy: CosignPolicy,
) -> str:
    """Verify one bundle over the artifact with digest ``artifact_digest``.

    ``artifact`` (the manifest bytes) is optional: it is needed only for Ed25519 keys,
    which cannot verify a prehashed message. Returns a short description of what
    verified; raises ``SignatureError`` with the reason otherwise.
    """
    if artifact_digest.algorithm != "sha256":
        raise SignatureError("bundles sign sha256 digests only")
    if artifact is not None and not artifact_digest.matches(artifact):
        raise SignatureError("artifact bytes do not match the artifact digest")
    # Cheap checks before any crypto.
    doc = json_object(raw, "bundle")
    if doc.get("mediaType") not in BUNDLE_MEDIA_TYPES:
        raise SignatureError(f"unsupported bundle mediaType {str(doc.get('mediaType'))[:80]!r}")
    material = _obj(doc.get("verificationMaterial"), "verificationMaterial")
    if policy.predicate_type is not None and "dsseEnvelope" not in doc:
        raise SignatureError(
            f"bundle is a plain signature, not an attestation of {policy.predicate_type!r}"
        )
    if policy.identity is not None:
        # 1. Keyless: a bare public key cannot prove an identity (GHSA-fx35-mq7g-6g98).
        if "certificate" not in material and "x509CertificateChain" not in material:
            raise SignatureError("bundle carries a bare public key where a certificate is required")
        return _verify_certificate_bundle(raw, artifact_digest, artifact, policy)
    if "publicKey" not in material:
        raise SignatureError("bundle carries a certificate, but the policy requires a key")
    return _verify_key_bundle(doc, material, artifact_digest, artifact, policy)


# ---- certificate bundles: sigstore-python ------------------------------------------


@dataclass(frozen=True, slots=True)
class _IdentityPolicy:
    """A sigstore ``VerificationPolicy`` with pullgate's exact-or-regexp matching."""

    identity: KeylessIdentity

    def verify(self, cert: x509.Certificate) -> None:
        try:
            check_identity(cert, self.identity)
        except SignatureError as exc:
            raise VerificationError(str(exc)) from exc


def _verify_certificate_bundle(
    raw: bytes, artifact_digest: Digest, artifact: bytes | None, policy: CosignPolicy
) -> str:
    assert policy.identity is not None
    verifier = policy.sigstore_verifier
    if verifier is None:
        raise SignatureError("the sigstore trusted root has no transparency logs")
    identity_policy = _IdentityPolicy(policy.identity)
    try:
        bundle = Bundle.from_json(raw)
        if bundle._dsse_envelope is not None:
            payload_type, payload = verifier.verify_dsse(bundle, identity_policy)
            _check_statement(payload_type, payload, artifact_digest, policy.predicate_type)
            return f"DSSE bundle by {policy.identity.describe()}"
        hashed: bytes | Hashed = (
            artifact
            if artifact is not None
            else Hashed(algorithm=HashAlgorithm.SHA2_256, digest=bytes.fromhex(artifact_digest.hex))
        )
        verifier.verify_artifact(hashed, bundle, identity_policy)
    except SigstoreError as exc:
        raise SignatureError(first_line(exc, 300)) from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # sigstore-python's models raise these on hostile documents; they are refusals.
        raise SignatureError(f"bundle is malformed: {first_line(exc, 300)}") from exc
    return f"bundle signature by {policy.identity.describe()}"


# ---- public-key bundles: our own code ----------------------------------------------


def _verify_key_bundle(
    doc: dict[str, Any],
    material: dict[str, Any],
    artifact_digest: Digest,
    artifact: bytes | None,
    policy: CosignPolicy,
) -> str:
    key = policy.key
    assert key is not None
    digest_bytes = bytes.fromhex(artifact_digest.hex)
    signer = SignerIdentity(key)
    bind: Callable[[LogEntry], None]
    if "messageSignature" in doc and "dsseEnvelope" not in doc:
        # 1. messageSignature: the signed message is the artifact (the manifest).
        message = _obj(doc["messageSignature"], "messageSignature")
        message_digest = message.get("messageDigest")
        if message_digest is not None:
            md = _obj(message_digest, "messageDigest")
            if md.get("algorithm") != "SHA2_256":
                raise SignatureError("bundle message digest is not SHA2_256")
            if _b64(md.get("digest"), "messageDigest") != digest_bytes:
                raise SignatureError("bundle message digest does not match the manifest digest")
        signature = _b64(message.get("signature"), "signature")
        if artifact is not None:
            verified = key.verify(signature, artifact)
        else:
            verified = key.verify_digest(signature, digest_bytes, hashes.SHA256())
        if not verified:
            raise SignatureError(f"bundle signature does not verify with the {key.kind} key")
        what = "bundle message signature"
        bind = partial(
            check_hashedrekord_binding,
            digest_hex=artifact_digest.hex,
            signature=signature,
            signer=signer,
        )
    elif "dsseEnvelope" in doc and "messageSignature" not in doc:
        # 2. DSSE: the signature is over PAE(payloadType, payload); the statement names
        #    the artifact among its subjects.
        envelope = _obj(doc["dsseEnvelope"], "dsseEnvelope")
        payload_type = envelope.get("payloadType")
        if not isinstance(payload_type, str):
            raise SignatureError("DSSE envelope has no payloadType")
        payload = _b64(envelope.get("payload"), "DSSE payload")
        signatures = envelope.get("signatures")
        if not isinstance(signatures, list) or not signatures:
            raise SignatureError("DSSE envelope has no signatures")
        pae = dsse_pae(payload_type, payload)
        sigs = (
            _b64(_obj(entry, "DSSE signature").get("sig"), "DSSE signature")
            for entry in signatures[:MAX_DSSE_SIGNATURES]
        )
        verified_sig = next((sig for sig in sigs if key.verify(sig, pae)), None)
        if verified_sig is None:
            raise SignatureError(f"DSSE signature does not verify with the {key.kind} key")
        _check_statement(payload_type, payload, artifact_digest, policy.predicate_type)
        what = "bundle DSSE attestation"
        bind = partial(check_dsse_binding, payload=payload, signature=verified_sig, signer=signer)
    else:
        raise SignatureError("bundle must have exactly one of messageSignature or dsseEnvelope")
    _check_tlog(material, policy, bind)
    return what


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what a DSSE signature signs."""
    encoded_type = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(encoded_type), encoded_type, len(payload), payload)


def _check_statement(
    payload_type: str, payload: bytes, artifact_digest: Digest, predicate_type: str | None
) -> None:
    """The in-toto statement must be about the artifact (GHSA-w6c6-c85g-mmv6)."""
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise SignatureError(f"DSSE payloadType {payload_type[:80]!r} is not in-toto")
    statement = json_object(payload, "in-toto statement")
    if statement.get("_type") not in IN_TOTO_STATEMENT_TYPES:
        raise SignatureError("in-toto statement has an unknown _type")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise SignatureError("in-toto statement has no subject")
    digests = [
        item.get("digest") for item in subjects[:MAX_STATEMENT_SUBJECTS] if isinstance(item, dict)
    ]
    if not any(
        isinstance(d, dict) and d.get(artifact_digest.algorithm) == artifact_digest.hex
        for d in digests
    ):
        raise SignatureError(f"in-toto statement is not about {artifact_digest}")
    # A plain cosign requirement takes signatures only: an attestation about the image
    # (provenance, an SBOM) is not an approval of it.
    got = statement.get("predicateType")
    shown = str(got)[:120]
    if predicate_type is None and got != COSIGN_SIGN_PREDICATE_TYPE:
        raise SignatureError(
            f"bundle is an attestation (predicate type {shown!r}), not a cosign signature "
            f"({COSIGN_SIGN_PREDICATE_TYPE}); attestations count only under attestation:"
        )
    if predicate_type is not None and got != predicate_type:
        raise SignatureError(f"predicate type {shown!r} is not {predicate_type!r}")


def _check_tlog(
    material: dict[str, Any],
    policy: CosignPolicy,
    bind: Callable[[LogEntry], None],
) -> None:
    """Verify the bundle's log entries: signed by a trusted log and bound to this signature.

    With ``tlog: required`` at least one entry must verify. Otherwise entries are checked
    when a trusted root is configured (a present but bad entry still fails), and ignored
    without one.
    """
    entries = material.get("tlogEntries") or []
    if not isinstance(entries, list):
        raise SignatureError("bundle tlogEntries is not a list")
    if not entries and policy.tlog_required:
        raise SignatureError("bundle has no transparency log entry (tlog: required)")
    if not entries or policy.trust is None:
        return
    for raw in entries[:MAX_TLOG_ENTRIES]:
        entry = parse_bundle_entry(raw)
        verify_entry(policy.trust, entry)
        bind(entry)
