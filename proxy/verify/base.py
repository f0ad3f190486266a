"""Shared shapes for the signature verifiers.

Verifiers are synchronous, CPU-bound functions over material the gate has already
fetched (size-capped) from the upstream. They never touch the network: trust
material is passed in. A failed check raises ``SignatureError`` (a security failure,
not a bug) or returns a failing ``CheckResult`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest


class SignatureError(Exception):
    """A signature, certificate or envelope that does not verify. Carries the reason."""


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
class SignatureArtifact:
    """One signature artifact fetched from the registry: its manifest and its blobs."""

    manifest: Manifest
    blobs: dict[Digest, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str
