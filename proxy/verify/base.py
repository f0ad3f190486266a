"""Shared shapes for the signature verifiers.

A verifier fetches signature material only through the gate's ``ArtifactSource``
(size-capped by ``Limits``) and runs its CPU-bound checks in a thread. Trust material
is passed in, never discovered. A failed check raises ``SignatureError`` (a security
failure, not a bug) or returns a failing ``CheckResult`` with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.oci.digest import Digest
from proxy.oci.errors import (
    OCIError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.oci.manifest import Descriptor, Manifest
from proxy.pipeline.gate import ArtifactSource


class SignatureError(Exception):
    """A signature, certificate or envelope that does not verify. Carries the reason."""


TRANSIENT_ERRORS: tuple[type[OCIError], ...] = (
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamError,
    TooManyRequests,
)
"""The registry could not be asked (unreachable, slow, 5xx, throttled, a broken body),
which says nothing about a signature: every verifier lets these propagate, so they end
as a 5xx and are never cached as a refusal. Any other ``OCIError`` is a reason."""


def json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    """Parse a JSON document that must be an object; else ``SignatureError``."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SignatureError(f"{what} is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise SignatureError(f"{what} is not a JSON object")
    return doc


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error as a short reason: its first line, or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Subject:
    """The manifest being verified, as signatures refer to it."""

    registry: str
    repository: str
    digest: Digest
    media_type: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str


class PolicyError(ValueError):
    """A policy file, requirement spec or trust material that cannot be loaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds against hostile registries; every one is configurable in the policy."""

    max_signatures: int = 32
    """Signature artifacts examined per digest (per verifier); more are ignored."""
    max_signature_manifest_bytes: int = 256 * 1024
    max_bundle_bytes: int = 1024 * 1024
    """Size cap on any signature blob: bundle, envelope or simple-signing payload."""
    deadline_seconds: float = 10.0
    """Total time for one manifest's verification, fetches included."""


class Verifier(Protocol):
    """One requirement leaf of a policy, e.g. ``cosign: {key: keys/release.pub}``.

    A verifier fetches the signature artifacts it needs through ``source`` (size-capped
    by ``limits``) and checks them against trust material it was constructed with.
    CPU-heavy checks run in a thread (``asyncio.to_thread``); nothing reaches the network
    except through ``source``.
    """

    def describe(self) -> str:
        """A short human label used in denials, e.g. ``cosign key keys/release.pub``."""

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        """Whether at least one signature over ``subject`` verifies; the reason if not."""


async def fetch_referrer(
    source: ArtifactSource,
    listed: Descriptor,
    subject: Subject,
    limits: Limits,
    *,
    artifact_type: str | None = None,
) -> Manifest:
    """The referrer a referrers listing names for ``subject``, fetched within the
    signature-manifest cap and checked, since the listing is only the registry's word:
    its digest is the listed one, its ``subject`` is ``subject`` (referrer spoofing)
    and, given ``artifact_type``, it has that type. ``SignatureError`` says why it does
    not count; fetch errors (``OCIError``) propagate."""
    if listed.size > limits.max_signature_manifest_bytes:
        raise SignatureError(f"referrer manifest of {listed.size} bytes exceeds the cap")
    referrer = await source.manifest(
        str(listed.digest), max_bytes=limits.max_signature_manifest_bytes
    )
    if referrer is None:
        raise SignatureError("listed but not found")
    if referrer.digest != listed.digest:
        raise SignatureError("referrer manifest digest does not match its listing")
    if referrer.subject is None or referrer.subject.digest != subject.digest:
        raise SignatureError("referrer is about another manifest (subject mismatch)")
    if artifact_type is not None and referrer.effective_artifact_type != artifact_type:
        got = str(referrer.effective_artifact_type)[:120]
        raise SignatureError(f"referrer's own artifactType is {got!r}")
    return referrer


async def list_referrers(
    source: ArtifactSource, subject: Subject, artifact_type: str, *, untyped: bool = True
) -> list[Descriptor]:
    """What the subject's referrers listing names with ``artifact_type`` (applied here too:
    a registry may ignore the filter) and, with ``untyped``, what names no type (older
    tools and the tag-schema fallback may not say). Only the registry's word: each one
    is checked by ``fetch_referrer``. ``SignatureError`` if the listing fails for another
    reason than ``TRANSIENT_ERRORS``, which propagate."""
    try:
        index = await source.referrers(subject.digest, artifact_type)
    except TRANSIENT_ERRORS:
        raise
    except OCIError as exc:
        raise SignatureError(f"referrers cannot be listed: {exc.message[:160]}") from exc
    accepted = (artifact_type, None) if untyped else (artifact_type,)
    return [d for d in (index.manifests if index else ()) if d.artifact_type in accepted]


async def fetch_signature_blob(
    source: ArtifactSource, layer: Descriptor, limits: Limits, *, what: str
) -> bytes:
    """A signature blob (bundle, envelope, simple-signing payload) within the bundle cap.

    ``SignatureError`` says why it does not count; ``TRANSIENT_ERRORS`` propagate."""
    if layer.size > limits.max_bundle_bytes:
        raise SignatureError(
            f"{what} of {layer.size} bytes exceeds the cap of {limits.max_bundle_bytes}"
        )
    try:
        return await source.blob(layer.digest, max_bytes=limits.max_bundle_bytes)
    except TRANSIENT_ERRORS:
        raise
    except OCIError as exc:
        raise SignatureError(f"{what} {layer.digest}: {exc.message[:160]}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustConfig:
    """The policy's shared ``trust:`` section, paths already resolved against the policy dir."""

    sigstore_trusted_root: Path | None = None
