"""The manifest path of a pull: resolve, fetch the exact bytes, check them, gate them.

A reference resolves upstream to a digest; the bytes fetched are checked against it
(and against ``Docker-Content-Digest``) and handed to the gate with a source it may
read signatures from. What the gate allows is served byte for byte, remembered, and
kept in the verified-manifest store with its verdict, so that while the upstream is
unreachable, content verified earlier keeps being served (within the verdict TTL,
and a tag within ``tag_staleness``). After a restart, what was allowed recently is
verified again in the background (``start_restore``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from proxy.cache.filechecks import LayerChecks
from proxy.cache.verified import VerifiedManifestStore
from proxy.metrics import Metrics
from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import (
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    OCIError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    VerificationFailed,
)
from proxy.oci.manifest import MAX_MANIFEST_BYTES, Descriptor, Manifest, build_index, parse_manifest
from proxy.oci.reference import ManifestRef, upstream_repository
from proxy.pipeline.allowances import BlobAllowances
from proxy.pipeline.gate import Gate, Pod, RepoKey, Verdict
from proxy.pipeline.tarcheck import LayerPlan
from proxy.upstream.auth import pull_scope
from proxy.upstream.router import Route

log = logging.getLogger("pullgate.pipeline")

MAX_SMALL_BODY = 4 * 1024 * 1024
VERIFIED_MANIFEST_ENTRIES = 4096
# ... and at most this many bytes of them: 4096 manifests near the 4 MiB cap would
# otherwise be 16 GiB of memory, from any upstream a pod can name with ``ns=``.
VERIFIED_MANIFEST_BYTES = 64 * 1024 * 1024
TAG_STALENESS_OFF = "upstream unavailable and tag staleness is off"
# After a restart, the manifests allowed within the verdict TTL are verified again, so
# pulls that were in flight can fetch their remaining blobs (at most this many).
RESTORE_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class ServedManifest:
    manifest: Manifest
    verdict: Verdict
    # Wall-clock time the verdict was reached (for the verdict TTL).
    verified_at: float = 0.0
    # True when served from the store because the upstream could not be reached.
    offline: bool = False


class _RepoSource:
    """``ArtifactSource`` for one repository: what a gate may fetch to verify."""

    def __init__(self, pipeline: ManifestPath, route: Route, repository: str) -> None:
        self._pipeline = pipeline
        self._route = route
        self._repository = repository

    async def manifest(self, reference: str, *, max_bytes: int) -> Manifest | None:
        ref = ManifestRef.parse(reference)
        try:
            return await self._pipeline.fetch_manifest(
                self._route, self._repository, ref, max_bytes=max_bytes
            )
        except ManifestUnknown:
            return None

    async def blob(self, digest: Digest, *, max_bytes: int) -> bytes:
        return await self._pipeline.fetch_small_blob(
            self._route, self._repository, digest, max_bytes=max_bytes
        )

    async def referrers(self, digest: Digest, artifact_type: str | None = None) -> Manifest | None:
        return await self._pipeline.fetch_referrers(
            self._route, self._repository, digest, artifact_type
        )

    def expect_layer_files(self, digest: Digest, plan: LayerPlan) -> None:
        repo = RepoKey(self._route.registry, self._repository)
        self._pipeline.layer_checks.expect(repo, digest, plan)


class ManifestPath:
    """Manifests and what verifying them reads: the manifest half of the pipeline."""

    def __init__(
        self,
        *,
        gate: Gate,
        verified: VerifiedManifestStore,
        metrics: Metrics,
        io: Executor,
        allowances: BlobAllowances,
        tag_staleness: float = 0.0,
        verdict_ttl: float | None = None,
        layer_checks: LayerChecks | None = None,
    ) -> None:
        self.gate = gate
        self.layer_checks = layer_checks or LayerChecks()
        self.verified = verified
        self.metrics = metrics
        self.hash_pool = io
        self._allowances = allowances
        # How long a tag may resolve to its last verified digest while the upstream is
        # down (seconds; 0 = off), and how long a verdict stays good (None = forever).
        self.tag_staleness = tag_staleness
        self.verdict_ttl = verdict_ttl
        self._verified: OrderedDict[tuple[str, str, Digest], ServedManifest] = OrderedDict()
        self._verified_bytes = 0

    async def get_manifest(
        self,
        route: Route,
        repository: str,
        ref: ManifestRef,
        *,
        accept: str | None = None,
        front: str = "mirror",
        pod: Pod | None = None,
    ) -> ServedManifest:
        """The manifest to serve for ``ref``: fetched once, checked, gated (for ``pod``,
        if the request is one's). ``front`` (mirror or cri) labels the
        verdict metrics.

        If the upstream cannot be reached, falls back to verified content in the store
        (see ``_serve_stored``).
        """
        repo = RepoKey(route.registry, repository)
        remembered: Manifest | None = None
        if ref.digest is not None:
            key = (route.registry, repository, ref.digest)
            cached = self._verified.get(key)
            if cached is not None:
                if self._verdict_fresh(cached.verified_at):
                    self._verified.move_to_end(key)
                    remembered = cached.manifest
                else:
                    self._forget_verified(key)
        try:
            # Bytes fetched by digest are immutable, so remembered ones need no refetch;
            # the gate still decides every time (its verdict cache makes that cheap), so
            # a policy reload applies to them at once and blob allowances stay recorded.
            manifest = remembered or await self.fetch_manifest(
                route, repository, ref, accept=accept
            )
            verdict = await self.gate.check_manifest(
                repo, manifest, _RepoSource(self, route, repository), pod=pod
            )
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            return await self._serve_stored(repo, ref, exc, pod)
        verified_at = time.time()
        result = "allow" if verdict.allowed else "deny"
        self.metrics.verdicts.labels(result, verdict.mode, front).inc()
        self.metrics.verdict_reasons.labels(verdict.reason_class or "unknown", front).inc()
        if not verdict.allowed:
            self.metrics.denied.labels("manifest", front).inc()
            log.warning("denied %s@%s: %s", repo, manifest.digest, verdict.reason)
            raise VerificationFailed(
                f"{repo}@{manifest.digest}: {verdict.reason}",
                detail={"scope": verdict.scope, "details": list(verdict.details)},
            )
        if verdict.mode != "enforce":
            log.warning(
                "serving %s@%s under mode %s: %s",
                repo,
                manifest.digest,
                verdict.mode,
                verdict.reason,
            )
        served = ServedManifest(manifest, verdict, verified_at)
        # Its blobs' upstream bodies are bound to the sizes it gives them.
        self._allowances.record_sizes(repo, manifest)
        if remembered is None:
            self._remember_verified(repo, served)
            await self._store_verified(repo, ref, served, pod)
        return served

    def _verdict_ttl(self) -> float | None:
        """How long an allowing verdict lasts: an explicit ``verdict_ttl``, else the
        policy's ``verdictCache.positiveTTL``; None (forever) without a policy."""
        if self.verdict_ttl is not None:
            return self.verdict_ttl
        return self.gate.positive_ttl

    def _verdict_fresh(self, verified_at: float) -> bool:
        ttl = self._verdict_ttl()
        return ttl is None or time.time() - verified_at <= ttl

    def _policy_revision(self) -> str:
        return self.gate.revision

    def _remember_verified(self, repo: RepoKey, served: ServedManifest) -> None:
        key = (repo.registry, repo.repository, served.manifest.digest)
        self._forget_verified(key)
        self._verified[key] = served
        self._verified_bytes += len(served.manifest.raw)
        while len(self._verified) > 1 and (
            len(self._verified) > VERIFIED_MANIFEST_ENTRIES
            or self._verified_bytes > VERIFIED_MANIFEST_BYTES
        ):
            self._forget_verified(next(iter(self._verified)))

    def _forget_verified(self, key: tuple[str, str, Digest]) -> None:
        forgotten = self._verified.pop(key, None)
        if forgotten is not None:
            self._verified_bytes -= len(forgotten.manifest.raw)

    async def _store_verified(
        self, repo: RepoKey, ref: ManifestRef, served: ServedManifest, pod: Pod | None
    ) -> None:
        """Keep an allowed manifest (and its tag) for when the upstream is down, with
        the pod it was decided for (scopes for pods make that part of the decision)."""
        manifest, verdict = served.manifest, served.verdict
        record: dict[str, Any] = {
            "allowed": verdict.allowed,
            "reason": verdict.reason,
            "scope": verdict.scope,
            "mode": verdict.mode,
            "details": list(verdict.details),
            "verifiedAt": served.verified_at,
            "policyRevision": self._policy_revision(),
            "pod": _pod_key(pod),
        }

        def write() -> None:
            self.verified.put_manifest(
                manifest.digest,
                manifest.raw,
                media_type=manifest.media_type,
                repo=str(repo),
                verdict=record,
            )
            if ref.tag is not None:
                self.verified.put_tag(str(repo), ref.tag, manifest.digest, served.verified_at)

        await asyncio.get_running_loop().run_in_executor(self.hash_pool, write)

    async def _serve_stored(
        self, repo: RepoKey, ref: ManifestRef, cause: OCIError, pod: Pod | None = None
    ) -> ServedManifest:
        """Serve a manifest verified earlier, because the upstream is unreachable.

        1. A tag resolves to its last verified digest only within ``tag_staleness``.
        2. The stored bytes are re-checked against the digest (the store does it).
        3. Only a verdict that allowed it for this very repository counts, and only
           while it is within the verdict TTL; where scopes differ by pod, only one
           reached for the same pod (or, like this request, for none).
        Anything else re-raises the upstream error (503/504), with the reason.
        """
        loop = asyncio.get_running_loop()
        digest = ref.digest
        if digest is None:
            assert ref.tag is not None
            if self.tag_staleness <= 0:
                raise UpstreamUnavailable(f"{TAG_STALENESS_OFF} ({cause.message})")
            tag = await loop.run_in_executor(
                self.hash_pool, self.verified.get_tag, str(repo), ref.tag
            )
            if tag is None:
                raise type(cause)(f"{cause.message}; tag {ref.tag} was never verified here")
            age = time.time() - tag.resolved_at
            if age > self.tag_staleness:
                raise type(cause)(
                    f"{cause.message}; tag {ref.tag} was last verified {age:.0f}s ago, "
                    f"beyond the tag staleness of {self.tag_staleness:.0f}s"
                )
            digest = tag.digest
        stored = await loop.run_in_executor(self.hash_pool, self.verified.get_manifest, digest)
        record = stored.verdicts.get(str(repo)) if stored is not None else None
        if stored is None or record is None or record.get("allowed") is not True:
            raise type(cause)(f"{cause.message}; {digest} is not a verified manifest in cache")
        verified_at = record.get("verifiedAt")
        if not isinstance(verified_at, (int, float)) or not self._verdict_fresh(verified_at):
            raise type(cause)(f"{cause.message}; the cached verdict for {digest} has expired")
        if record.get("policyRevision", "") != self._policy_revision():
            raise type(cause)(
                f"{cause.message}; {digest} was verified under another policy revision"
            )
        if self.gate.pod_scoped and ("pod" not in record or record["pod"] != _pod_key(pod)):
            raise type(cause)(
                f"{cause.message}; {digest} was verified for another pull context (scopes "
                "for pods may decide it differently)"
            )
        manifest = parse_manifest(stored.raw, stored.media_type)
        details = record.get("details")
        verdict = Verdict(
            allowed=True,
            reason=str(record.get("reason", "")),
            scope=str(record.get("scope", "")),
            mode=str(record.get("mode", "enforce")),
            details=tuple(str(d) for d in details) if isinstance(details, list) else (),
        )
        self._allowances.allow_offline(repo, manifest, float(verified_at))
        self._allowances.record_sizes(repo, manifest)
        log.warning(
            "upstream of %s unavailable (%s); serving %s@%s verified %.0fs ago from the cache",
            repo,
            cause.message,
            repo,
            digest,
            time.time() - verified_at,
        )
        return ServedManifest(manifest, verdict, float(verified_at), offline=True)

    async def fetch_manifest(
        self,
        route: Route,
        repository: str,
        ref: ManifestRef,
        *,
        accept: str | None = None,
        max_bytes: int = MAX_MANIFEST_BYTES,
    ) -> Manifest:
        """Fetch and check a manifest upstream (not gated: the caller gates it)."""
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(
            f"/v2/{urepo}/manifests/{ref}",
            scope=pull_scope(urepo),
            headers={"Accept": _manifest_accept(accept)},
        )
        async with response:
            if response.status == 404:
                raise ManifestUnknown(f"manifest {ref} not found in {route.registry}/{repository}")
            raw = await response.read_capped(max_bytes, what=f"manifest {ref}")
            if raw is None:
                raise ManifestTooLarge(
                    f"manifest {ref} of {route.registry}/{repository} is larger than "
                    f"{max_bytes} bytes"
                )
            content_type = response.headers.get("Content-Type")
            header_digest = response.headers.get("Docker-Content-Digest")
        manifest = parse_manifest(raw, content_type)
        if ref.digest is not None and manifest.digest != ref.digest:
            self.metrics.digest_mismatch.labels(route.registry).inc()
            raise UpstreamError(
                f"upstream returned manifest bytes hashing to {manifest.digest} "
                f"for requested digest {ref.digest}"
            )
        if header_digest and header_digest != str(manifest.digest):
            raise UpstreamError(
                f"upstream Docker-Content-Digest {header_digest[:80]} does not match the "
                f"bytes it sent ({manifest.digest})"
            )
        return manifest

    def start_restore(self, route_for: Callable[[str], Route]) -> None:
        """Verify again, in the background, what this node allowed shortly before it
        (re)started, so that pulls in flight across a restart (a DaemonSet rollout)
        can fetch their remaining blobs instead of meeting 403 ``DENIED``.

        Only manifests allowed within the verdict TTL are considered, and each goes
        through ``get_manifest`` like any request: the gate decides afresh, under the
        policy in force now. ``route_for`` maps a registry name to its route.
        """
        if not self.gate.policy_in_force:
            return  # no policy: every blob is allowed anyway
        self._allowances.restoring = asyncio.get_running_loop().create_task(
            self._restore(route_for)
        )

    async def _restore(self, route_for: Callable[[str], Route]) -> int:
        started = time.monotonic()
        ttl = self._verdict_ttl()
        if not ttl:
            return 0  # verdicts are not kept: nothing was allowed "recently"
        since = time.time() - ttl
        loop = asyncio.get_running_loop()
        try:
            recent = await loop.run_in_executor(
                self.hash_pool, self.verified.recent_verdicts, since, RESTORE_LIMIT
            )
        except Exception:
            log.exception("could not list recently verified manifests")
            return 0
        # Indexes first: a child covered by a verified index is decided through it.
        recent.sort(key=lambda v: (v.media_type not in mt.INDEXES, -v.verified_at))
        restored = 0
        for item in recent:
            registry, _, repository = item.repo.partition("/")
            try:
                route = route_for(registry)
                await self.get_manifest(route, repository, ManifestRef(digest=item.digest))
            except OCIError as exc:
                log.info("not restored %s@%s: %s", item.repo, item.digest, exc.message)
                continue
            except Exception:
                log.exception("restoring %s@%s failed", item.repo, item.digest)
                continue
            restored += 1
        if recent:
            log.info(
                "restart: %d of %d recently allowed manifests verified again in %.2fs",
                restored,
                len(recent),
                time.monotonic() - started,
            )
        return restored

    async def fetch_small_blob(
        self, route: Route, repository: str, digest: Digest, *, max_bytes: int
    ) -> bytes:
        """A size-capped, digest-checked blob for verification material."""
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(f"/v2/{urepo}/blobs/{digest}", scope=pull_scope(urepo))
        async with response:
            if response.status == 404:
                raise BlobUnknown(f"blob {digest} not found in {route.registry}/{repository}")
            data = await response.read_capped(max_bytes, what=f"blob {digest}")
        if data is None:
            raise ManifestTooLarge(f"blob {digest} is larger than the {max_bytes}-byte limit")
        if not digest.matches(data):
            self.metrics.digest_mismatch.labels(route.registry).inc()
            raise UpstreamError(f"upstream bytes of blob {digest} do not match its digest")
        return data

    async def tags(self, route: Route, repository: str, query: str) -> tuple[bytes, str | None]:
        """The upstream tag list (and its pagination Link header), size-capped."""
        urepo = upstream_repository(route.registry, repository)
        path = f"/v2/{urepo}/tags/list" + (f"?{query}" if query else "")
        response = await route.client.get(path, scope=pull_scope(urepo))
        async with response:
            if response.status == 404:
                raise NameUnknown(f"repository {route.registry}/{repository} not found")
            body = await response.read_capped(MAX_SMALL_BODY, what="tag list")
            link = response.headers.get("Link")
        if body is None:
            raise UpstreamError("upstream tag list is larger than 4 MiB")
        return body, link

    async def fetch_referrers(
        self, route: Route, repository: str, digest: Digest, artifact_type: str | None
    ) -> Manifest | None:
        """Referrers of ``digest``: the upstream API where it exists, else the
        ``<alg>-<hex>`` fallback tag. Filtered by ``artifact_type`` if given (asked of
        the API too, but filtered here whether or not it applied the filter)."""
        urepo = upstream_repository(route.registry, repository)
        query = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
        response = await route.client.get(
            f"/v2/{urepo}/referrers/{digest}{query}",
            scope=pull_scope(urepo),
            headers={"Accept": mt.OCI_INDEX},
        )
        index: Manifest | None = None
        async with response:
            content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
            if response.status == 200 and content_type == mt.OCI_INDEX:
                raw = await response.read_capped(MAX_MANIFEST_BYTES, what="referrers index")
                if raw is None:
                    raise ManifestTooLarge("upstream referrers index is larger than 4 MiB")
                index = parse_manifest(raw, content_type)
        if index is None:
            try:
                index = await self.fetch_manifest(
                    route, repository, ManifestRef(tag=digest.fallback_tag)
                )
            except ManifestUnknown:
                return None
            if not index.is_index:
                return None
        if artifact_type is None:
            return index
        kept = [d for d in index.manifests if d.artifact_type == artifact_type]
        return parse_manifest(build_index(kept), mt.OCI_INDEX)

    async def referrers_index(
        self, route: Route, repository: str, digest: Digest, artifact_type: str | None
    ) -> bytes:
        index = await self.fetch_referrers(route, repository, digest, artifact_type)
        descriptors: list[Descriptor] = list(index.manifests) if index is not None else []
        return build_index(descriptors)


def _pod_key(pod: Pod | None) -> list[Any] | None:
    """The pod a stored verdict was reached for, as JSON (None: no pod)."""
    if pod is None:
        return None
    return [pod.namespace, [list(label) for label in pod.labels]]


def _manifest_accept(client_accept: str | None) -> str:
    """Forward the manifest types the client accepts; default to all we can check."""
    if not client_accept:
        return mt.ACCEPT_MANIFESTS
    wanted = [part.split(";")[0].strip().lower() for part in client_accept.split(",")]
    known = [t for t in wanted if t in mt.MANIFEST_TYPES]
    return ", ".join(dict.fromkeys(known)) if known else mt.ACCEPT_MANIFESTS
