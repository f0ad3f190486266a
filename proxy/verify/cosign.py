"""cosign signatures over an image manifest: legacy ``.sig`` tags and sigstore bundles.

A policy leaf ``cosign: {...}`` becomes one ``CosignVerifier``:

* ``{key: keys/release.pub}``: a PEM public key (ECDSA P-256/P-384/P-521, RSA, Ed25519);
* ``{keyless: {issuer: ..., subject: ...}}``: a Fulcio certificate chaining to the
  ``trust.sigstoreTrustedRoot``; issuer and subject are exact, or ``regexp:<re>``;
* ``tlog: required|optional`` (default optional): whether a Rekor entry must verify;
* ``reference: exact|repository`` (default unchecked): the payload's
  ``critical.identity.docker-reference`` must be ``registry/repository`` exactly (cosign
  writes it without a tag), or name that repository with any tag or digest;
* ``predicateType: URI``: the in-toto predicate a DSSE bundle must carry; then only
  DSSE attestations count (a plain signature or a message-signature bundle does not).
  Without it only signatures count: a DSSE bundle must carry the predicate type
  ``cosign sign --new-bundle-format`` writes, never an attestation's.

Verification looks for (1) the legacy signature image at tag ``sha256-<hex>.sig``, whose
simple-signing layers each carry a signature annotation, then (2) referrers of type
``application/vnd.dev.sigstore.bundle.v0.3+json``. One verified signature is enough.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError
from proxy.oci.manifest import MAX_MANIFEST_BYTES, Descriptor
from proxy.pipeline.gate import ArtifactSource
from proxy.verify.base import (
    TRANSIENT_ERRORS,
    CheckResult,
    Limits,
    PolicyError,
    SignatureError,
    Subject,
    TrustConfig,
    Verifier,
    fetch_referrer,
    fetch_signature_blob,
    json_object,
    list_referrers,
)
from proxy.verify.bundle import CosignPolicy, sigstore_verifier_for, verify_bundle
from proxy.verify.keys import (
    KeyFormatError,
    VerificationKey,
    b64decode_strict,
    certificate_key,
    load_certificates_pem,
    load_public_key_pem,
)
from proxy.verify.rekor import (
    SignerIdentity,
    check_hashedrekord_binding,
    parse_legacy_bundle,
    verify_set,
)
from proxy.verify.sigstore_trust import (
    KeylessIdentity,
    Matcher,
    SigstoreTrustRoot,
    check_identity,
    load_trusted_root,
    verify_certificate_chain,
)

ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
ANN_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANN_CHAIN = "dev.sigstore.cosign/chain"
ANN_BUNDLE = "dev.sigstore.cosign/bundle"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"
MAX_REASON_CHARS = 600
MAX_KEY_FILE_BYTES = 64 * 1024
_SPEC_KEYS = frozenset({"key", "keyless", "tlog", "reference", "predicateType"})


@dataclass(frozen=True, slots=True)
class LegacySignature:
    """One layer of a ``.sig`` image: the payload bytes and the layer annotations."""

    payload: bytes
    annotations: Mapping[str, str]


# ---- the verifier -------------------------------------------------------------------


async def _verified(check: Callable[[], object], what: str, failures: list[str]) -> bool:
    """Run one signature check off the event loop; a refusal is recorded in ``failures``."""
    try:
        await asyncio.to_thread(check)
    except SignatureError as exc:
        failures.append(str(exc))
        return False
    except ValueError as exc:
        # cryptography parses certificate extensions lazily and raises ValueError on
        # hostile DER: a refusal, not a crash.
        failures.append(f"malformed {what}: {str(exc)[:160]}")
        return False
    return True


class CosignVerifier:
    """A ``Verifier`` for one cosign requirement; see the module docstring."""

    def __init__(self, *, label: str, policy: CosignPolicy, reference: str | None = None) -> None:
        if reference not in (None, "exact", "repository"):
            raise PolicyError("cosign reference must be 'exact' or 'repository'")
        self._label = label
        self._policy = policy
        self._reference = reference

    @property
    def policy(self) -> CosignPolicy:
        return self._policy

    def describe(self) -> str:
        return self._label

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        """(1) legacy ``.sig`` signatures, then (2) bundle referrers; one must verify."""
        failures: list[str] = []
        try:
            async with asyncio.timeout(limits.deadline_seconds):
                # A plain signature carries no statement: never an attestation.
                plain_ok = self._policy.predicate_type is None
                if plain_ok and await self._verify_legacy(subject, source, limits, failures):
                    return CheckResult(True, f"{self._label}: signature verified")
                if await self._verify_bundles(subject, source, limits, failures):
                    return CheckResult(True, f"{self._label}: bundle verified")
        except TimeoutError:
            failures.append(f"verification deadline of {limits.deadline_seconds:g}s exceeded")
        return CheckResult(False, self._denial(failures))

    def _denial(self, failures: list[str]) -> str:
        head = f"no cosign signature verified with {self._label.removeprefix('cosign ')}"
        # Distinct reasons only, in order, bounded: a flood must not make a huge message.
        unique = list(dict.fromkeys(failures)) or ["no signatures found"]
        text = f"{head}: " + "; ".join(unique)
        if len(text) > MAX_REASON_CHARS:
            text = text[: MAX_REASON_CHARS - 1] + "…"
        return text

    # (1) legacy signature image -------------------------------------------------------

    async def _verify_legacy(
        self, subject: Subject, source: ArtifactSource, limits: Limits, failures: list[str]
    ) -> bool:
        if subject.digest.algorithm != "sha256":
            return False
        tag = f"{subject.digest.fallback_tag}.sig"
        try:
            sig_manifest = await source.manifest(tag, max_bytes=limits.max_signature_manifest_bytes)
        except TRANSIENT_ERRORS:
            raise
        except OCIError as exc:
            failures.append(f"signature manifest {tag}: {exc.message[:160]}")
            return False
        if sig_manifest is None:
            return False
        layers = [d for d in sig_manifest.layers if d.media_type == mt.COSIGN_SIMPLESIGNING]
        if not layers:
            failures.append("signature image has no simple-signing layers")
            return False
        payloads: dict[Digest, bytes] = {}
        for layer in layers[: limits.max_signatures]:
            if ANN_SIGNATURE not in layer.annotations:
                failures.append("layer has no signature annotation")
                continue
            payload = payloads.get(layer.digest)
            if payload is None:
                try:
                    payload = await fetch_signature_blob(source, layer, limits, what="payload")
                except SignatureError as exc:
                    failures.append(str(exc))
                    continue
                payloads[layer.digest] = payload
            signature = LegacySignature(payload, dict(layer.annotations))
            check = partial(self.verify_legacy_signature, signature, subject)
            if await _verified(check, "signature material", failures):
                return True
        if len(layers) > limits.max_signatures:
            failures.append(f"only the first {limits.max_signatures} signatures were examined")
        return False

    def verify_legacy_signature(
        self, signature: LegacySignature, subject: Subject, *, now: datetime | None = None
    ) -> None:
        """Check one simple-signing signature over ``subject``; raise ``SignatureError``.

        Steps: (a) decode the signature; (b) find the signer key, from the policy key or
        from the certificate annotation; (c) verify the signature over the payload bytes;
        (d) verify the Rekor SET and bind its entry to this payload, signature and signer;
        (e) chain the certificate to the trusted root at the log's integration time and
        match its identity; (f) check the payload names this manifest digest.
        """
        policy = self._policy
        annotations = signature.annotations
        try:
            # (a)
            sig_bytes = b64decode_strict(annotations.get(ANN_SIGNATURE, ""), what="signature")
            if not sig_bytes:
                raise SignatureError("empty signature annotation")
            # (b)
            certificate: x509.Certificate | None = None
            intermediates: list[x509.Certificate] = []
            if policy.key is not None:
                key = policy.key
            else:
                cert_pem = annotations.get(ANN_CERTIFICATE)
                if not cert_pem:
                    raise SignatureError("signature has no certificate")
                certificate = load_certificates_pem(cert_pem.encode(), max_count=1)[0]
                chain_pem = annotations.get(ANN_CHAIN)
                intermediates = load_certificates_pem(chain_pem.encode()) if chain_pem else []
                key = certificate_key(certificate)
        except KeyFormatError as exc:
            raise SignatureError(str(exc)) from exc
        # (c)
        if not key.verify(sig_bytes, signature.payload):
            raise SignatureError(f"signature does not verify with the {key.kind} key")
        # (d)
        signed_at: datetime | None = None
        bundle_annotation = annotations.get(ANN_BUNDLE)
        if bundle_annotation and policy.trust is not None:
            entry = parse_legacy_bundle(bundle_annotation)
            verify_set(policy.trust, entry)
            check_hashedrekord_binding(
                entry,
                digest_hex=hashlib.sha256(signature.payload).hexdigest(),
                signature=sig_bytes,
                signer=SignerIdentity(key, certificate),
            )
            signed_at = entry.integrated_at
        elif policy.tlog_required:
            raise SignatureError("no Rekor bundle (tlog: required)")
        # (e) A keyless certificate lives ~10 minutes: without a trusted log time it can
        #     only be checked against the current time.
        if certificate is not None:
            assert policy.trust is not None and policy.identity is not None
            at = signed_at or now or datetime.now(UTC)
            verify_certificate_chain(policy.trust, certificate, intermediates, at=at)
            check_identity(certificate, policy.identity)
        # (f)
        self._check_payload(signature.payload, subject)

    def _check_payload(self, payload: bytes, subject: Subject) -> None:
        critical = json_object(payload, "payload").get("critical")
        if not isinstance(critical, dict):
            raise SignatureError("payload has no critical section")
        kind = critical.get("type")
        if not isinstance(kind, str) or kind.lower() != COSIGN_SIGNATURE_TYPE:
            raise SignatureError(f"payload type {str(kind)[:80]!r} is not a cosign signature")
        image = critical.get("image")
        signed_digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
        if not isinstance(signed_digest, str):
            raise SignatureError("payload has no docker-manifest-digest")
        if signed_digest != str(subject.digest):
            raise SignatureError(
                f"payload digest does not match (signed {signed_digest[:80]}, "
                f"manifest {subject.digest})"
            )
        if self._reference is not None:
            identity = critical.get("identity")
            ref = identity.get("docker-reference") if isinstance(identity, dict) else None
            if not isinstance(ref, str):
                raise SignatureError("payload has no docker-reference")
            if not reference_matches(ref, subject, exact=self._reference == "exact"):
                raise SignatureError(
                    f"payload docker-reference {ref[:120]!r} does not match {subject.name}"
                )

    # (2) bundle referrers -------------------------------------------------------------

    async def _verify_bundles(
        self, subject: Subject, source: ArtifactSource, limits: Limits, failures: list[str]
    ) -> bool:
        try:
            candidates = await list_referrers(source, subject, mt.SIGSTORE_BUNDLE_V03)
        except SignatureError as exc:
            failures.append(str(exc))
            return False
        artifact = await self._artifact_bytes(subject, source) if candidates else None
        for descriptor in candidates[: limits.max_signatures]:
            try:
                raw = await self._fetch_bundle(descriptor, subject, source, limits)
            except TRANSIENT_ERRORS:
                raise
            except OCIError as exc:
                failures.append(f"bundle referrer: {exc.message[:160]}")
                continue
            except SignatureError as exc:
                failures.append(str(exc))
                continue
            check = partial(
                verify_bundle,
                raw,
                artifact_digest=subject.digest,
                artifact=artifact,
                policy=self._policy,
            )
            if await _verified(check, "bundle", failures):
                return True
        if len(candidates) > limits.max_signatures:
            failures.append(f"only the first {limits.max_signatures} bundles were examined")
        return False

    async def _artifact_bytes(self, subject: Subject, source: ArtifactSource) -> bytes | None:
        """The manifest bytes, only for Ed25519 keys: they cannot check a prehashed message."""
        policy_key = self._policy.key
        if policy_key is None or not isinstance(policy_key.key, ed25519.Ed25519PublicKey):
            return None
        try:
            manifest = await source.manifest(str(subject.digest), max_bytes=MAX_MANIFEST_BYTES)
        except TRANSIENT_ERRORS:
            raise
        except OCIError:
            return None
        if manifest is None or not subject.digest.matches(manifest.raw):
            return None
        return manifest.raw

    async def _fetch_bundle(
        self, descriptor: Descriptor, subject: Subject, source: ArtifactSource, limits: Limits
    ) -> bytes:
        try:
            referrer = await fetch_referrer(source, descriptor, subject, limits)
        except SignatureError as exc:
            raise SignatureError(f"bundle {exc}") from exc
        for layer in referrer.layers:
            if layer.media_type == mt.SIGSTORE_BUNDLE_V03 or layer.media_type.startswith(
                "application/vnd.dev.sigstore.bundle+json"
            ):
                return await fetch_signature_blob(source, layer, limits, what="bundle")
        raise SignatureError("bundle referrer has no bundle layer")


# ---- docker-reference matching ------------------------------------------------------


def _split_reference(ref: str) -> tuple[str, str]:
    """``host/repo[:tag][@digest]`` → (name, rest), with Docker Hub normalisation."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    rest = ref[len(name) :]
    first, _, remainder = name.partition("/")
    if not remainder or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name}"
    host, _, path = name.partition("/")
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        host = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    return f"{host}/{path}", rest


def reference_matches(ref: str, subject: Subject, *, exact: bool) -> bool:
    """Whether a payload's docker-reference names the subject's repository.

    ``exact``: the reference is the bare repository name (no tag or digest), as cosign
    writes it. Otherwise any tag or digest of the same repository matches.
    """
    name, rest = _split_reference(ref)
    want, _ = _split_reference(subject.name)
    if exact and rest:
        return False
    return name == want


# ---- construction from a policy spec ------------------------------------------------


def _load_key(path: Path, label: str) -> VerificationKey:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read cosign key {label}: {exc.strerror or exc}") from exc
    try:
        return load_public_key_pem(data)
    except KeyFormatError as exc:
        raise PolicyError(f"cosign key {label}: {exc}") from exc


def cosign_verifier_from_spec(
    spec: Mapping[str, Any], *, base_dir: Path, trust: TrustConfig
) -> Verifier:
    """Build the verifier for one ``cosign:`` policy leaf; any problem is a ``PolicyError``."""
    if not isinstance(spec, Mapping):
        raise PolicyError("cosign requirement must be a mapping")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise PolicyError(f"cosign requirement has unknown keys: {', '.join(sorted(unknown))}")
    tlog = spec.get("tlog", "optional")
    if tlog not in ("required", "optional"):
        raise PolicyError("cosign tlog must be 'required' or 'optional'")
    predicate_type = spec.get("predicateType")
    if predicate_type is not None and (not isinstance(predicate_type, str) or not predicate_type):
        raise PolicyError("cosign predicateType must be a non-empty string")
    has_key, has_keyless = "key" in spec, "keyless" in spec
    if has_key == has_keyless:
        raise PolicyError("cosign requirement needs exactly one of 'key' or 'keyless'")

    # Even a key policy loads the root: it checks any Rekor entry a signature carries.
    root: SigstoreTrustRoot | None = None
    if trust.sigstore_trusted_root is not None:
        root = load_trusted_root(trust.sigstore_trusted_root)

    policy_with = partial(
        CosignPolicy, trust=root, tlog_required=tlog == "required", predicate_type=predicate_type
    )
    if has_key:
        key_text = spec["key"]
        if not isinstance(key_text, str) or not key_text:
            raise PolicyError("cosign key must be a file path")
        label = f"cosign key {key_text}"
        policy = policy_with(key=_load_key(base_dir / key_text, key_text))
    else:
        keyless = spec["keyless"]
        if not isinstance(keyless, Mapping) or set(keyless) - {"issuer", "subject"}:
            raise PolicyError("cosign keyless must be a mapping with 'issuer' and 'subject'")
        identity = KeylessIdentity(
            subject=Matcher.parse(keyless.get("subject"), where="cosign keyless subject"),
            issuer=Matcher.parse(keyless.get("issuer"), where="cosign keyless issuer"),
        )
        if root is None:
            raise PolicyError("cosign keyless needs trust.sigstoreTrustedRoot")
        label = f"cosign keyless {identity.describe()}"
        verifier = sigstore_verifier_for(root) if root.tlogs else None
        policy = policy_with(identity=identity, sigstore_verifier=verifier)
    # The verifier checks ``reference`` (exact or repository).
    return CosignVerifier(label=label, policy=policy, reference=spec.get("reference"))
