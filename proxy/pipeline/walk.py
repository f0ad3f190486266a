"""One walk over an index's children, for every caller that checks them.

An index's children (one per platform, plus attestations) each go through the same
``get_manifest`` a pull of that child would: fetched, checked, gated. Prefetch and
``pullgate verify`` both walk them; this is the one walk they share, so they agree on
the order (the index's), the cap (``MAX_INDEX_CHILDREN``: an index may list any number
of children, and each costs upstream requests and a verification) and how many
children the cap left unchecked.

A child's refusal or upstream failure does not end the walk: it is that child's
outcome, and the caller decides what it means. Both callers treat attestation
manifests that buildx puts in an index (platform ``unknown/unknown``,
``vnd.docker.reference.type: attestation-manifest``) alike: checked and reported, but
a refused one does not fail the reference, since containerd never pulls it as a
platform.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from proxy.oci.errors import OCIError
from proxy.oci.manifest import Descriptor, Manifest
from proxy.oci.reference import ManifestRef
from proxy.pipeline.manifests import ServedManifest
from proxy.upstream.router import Route

MAX_INDEX_CHILDREN = 64
ATTESTATION_TYPE_KEY = "vnd.docker.reference.type"


class GatedManifests(Protocol):
    """What the walk needs of the pipeline: a manifest fetched, checked and gated."""

    async def get_manifest(
        self, route: Route, repository: str, ref: ManifestRef, *, accept: str | None = None
    ) -> ServedManifest:
        """The manifest to serve for ``ref``; raises ``OCIError`` (``Denied`` included)."""


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """One child of an index: served (allowed), or the error it met (refused or not
    fetched). Exactly one of ``served`` and ``error`` is set."""

    descriptor: Descriptor
    served: ServedManifest | None = None
    error: OCIError | None = None

    @property
    def attestation(self) -> bool:
        """A buildx attestation entry of the index, not a platform image."""
        return is_attestation(self.descriptor)

    def result(self) -> ServedManifest:
        """The served child, or its error raised."""
        if self.error is not None:
            raise self.error
        assert self.served is not None
        return self.served


class IndexWalk:
    """``async for outcome in IndexWalk(...)``: each child up to the cap, in order.

    ``checked`` are the children the walk visits and ``not_checked`` how many it
    leaves out; both are known before the first child is fetched. A manifest that is
    not an index has no children.
    """

    def __init__(
        self,
        pipeline: GatedManifests,
        route: Route,
        repository: str,
        index: Manifest,
        *,
        max_children: int = MAX_INDEX_CHILDREN,
    ) -> None:
        self._pipeline = pipeline
        self._route = route
        self._repository = repository
        children = index.manifests if index.is_index else ()
        self.checked: tuple[Descriptor, ...] = tuple(children[:max_children])
        self.not_checked = len(children) - len(self.checked)

    def __aiter__(self) -> AsyncIterator[ChildOutcome]:
        return self._walk()

    async def _walk(self) -> AsyncIterator[ChildOutcome]:
        for child in self.checked:
            try:
                served = await self._pipeline.get_manifest(
                    self._route, self._repository, ManifestRef(digest=child.digest)
                )
            except OCIError as exc:
                yield ChildOutcome(child, error=exc)
                continue
            yield ChildOutcome(child, served=served)


def is_attestation(child: Descriptor) -> bool:
    """A buildx attestation entry of an index, not a platform image."""
    if child.annotations.get(ATTESTATION_TYPE_KEY) == "attestation-manifest":
        return True
    platform = child.platform or {}
    return platform.get("os") == "unknown" and platform.get("architecture") == "unknown"
