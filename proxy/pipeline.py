"""The one place that orchestrates a pull.

Manifests: resolve the reference upstream, fetch the exact bytes, check them, ask the
gate, and serve exactly the bytes that were checked. Blobs: ask the gate, then stream
from the store or the upstream while hashing, holding the tail back until the digest
matches. The HTTP front end (and later the CRI one) call this; neither re-implements it.

When the upstream cannot be reached, content verified earlier keeps being served:
cached blobs never need the upstream, manifests asked for by digest come from the
store with the verdict they passed (within the verdict TTL), and a tag resolves to
its last verified digest for at most ``tag_staleness`` seconds (0: never).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.cache import BlobSink, BlobStore
from proxy.cache.directio import DIRECT_MIN_BYTES, DirectReader, resident
from proxy.cache.fill import Fill, FillReader, FillTable
from proxy.cache.follow import Follow
from proxy.cache.verified import VerifiedManifestStore
from proxy.gate import Gate, RepoKey, Verdict
from proxy.metrics import Metrics
from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import (
    BlobNotAllowed,
    BlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    OCIError,
    StreamAborted,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    VerificationFailed,
)
from proxy.oci.manifest import MAX_MANIFEST_BYTES, Descriptor, Manifest, build_index, parse_manifest
from proxy.oci.ranges import ByteRange, parse_range
from proxy.oci.reference import ManifestRef, upstream_repository
from proxy.stream import BodyBroken, DataPath, HeldBackSender, hash_and_deliver
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.router import Route
from proxy.verify.shared import OFFLINE, SharedAllowances

log = logging.getLogger("pullgate.pipeline")

MAX_SMALL_BODY = 4 * 1024 * 1024
VERIFIED_MANIFEST_ENTRIES = 4096
# Blobs allowed by manifests served from the store while the upstream was down.
OFFLINE_ALLOWED_ENTRIES = 65536
TAG_STALENESS_OFF = "upstream unavailable and tag staleness is off"
# After a restart, the manifests allowed within the verdict TTL are verified again, so
# pulls that were in flight can fetch their remaining blobs (at most this many).
RESTORE_LIMIT = 1024
# How long a blob request that would be refused waits for that restore to finish.
RESTORE_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class ServedManifest:
    manifest: Manifest
    verdict: Verdict
    # Wall-clock time the verdict was reached (for the verdict TTL).
    verified_at: float = 0.0
    # True when served from the store because the upstream could not be reached.
    offline: bool = False


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A verified blob on local disk: served with sendfile."""

    digest: Digest
    path: Path
    size: int


class BlobStream:
    """A blob streamed from the upstream, hashed inline, tail held back."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        registry: str,
        digest: Digest,
        response: UpstreamResponse,
        size: int | None,
        byte_range: ByteRange | None,
    ) -> None:
        self._pipeline = pipeline
        self._registry = registry
        self.digest = digest
        self._response = response
        self.size = size
        self.byte_range = byte_range

    @property
    def content_length(self) -> int | None:
        if self.byte_range is not None:
            return self.byte_range.length
        return self.size

    async def send_to(self, sink: BlobSink) -> None:
        """Send the (ranged) body. The last ``HOLD_BACK`` bytes go out only once the
        whole blob hashed to its digest; on mismatch or truncation ``StreamAborted``
        is raised instead, and the caller must abort the client connection."""
        metrics = self._pipeline.metrics
        datapath = self._pipeline.datapath
        body = self._response.body_reader()
        sender = HeldBackSender(
            await sink.thread_sender(), byte_range=self.byte_range, size=self.size
        )

        def move() -> int:
            received = hash_and_deliver(
                digest=self.digest,
                size=self.size,
                body=body,
                deliver=sender,
                hashers=datapath.hashers,
            )
            sender.release()
            return received

        metrics.streams_active.inc()
        try:
            received = await datapath.run(body, move)
        except BodyBroken as exc:
            raise self._broken(exc.reason, truncated=exc.truncated) from None
        except OCIError as exc:
            raise self._broken(exc.message, truncated=True) from None
        finally:
            body.close()
            metrics.streams_active.dec()
            self._response.close()
        metrics.upstream_bytes.labels(self._registry).inc(received)
        served = self.byte_range.length if self.byte_range else received
        metrics.bytes_served.labels("upstream").inc(served)

    def _broken(self, reason: str, *, truncated: bool) -> StreamAborted:
        metrics = self._pipeline.metrics
        if truncated:
            metrics.upstream_truncated.labels(self._registry).inc()
        else:
            metrics.digest_mismatch.labels(self._registry).inc()
        log.error(
            "aborting blob %s from %s: %s; the client connection is cut so no complete "
            "wrong body is delivered",
            self.digest,
            self._registry,
            reason,
        )
        return StreamAborted(f"blob {self.digest}: {reason}")

    def close(self) -> None:
        self._response.close()


class _RepoSource:
    """``ArtifactSource`` for one repository: what a gate may fetch to verify."""

    def __init__(self, pipeline: Pipeline, route: Route, repository: str) -> None:
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


class Pipeline:
    def __init__(
        self,
        *,
        gate: Gate,
        store: BlobStore,
        manifests: VerifiedManifestStore,
        metrics: Metrics,
        hash_workers: int = 8,
        complete_on_disconnect: bool = False,
        direct_min_bytes: int = DIRECT_MIN_BYTES,
        tag_staleness: float = 0.0,
        verdict_ttl: float | None = None,
        shared: SharedAllowances | None = None,
    ) -> None:
        self.gate = gate
        # Verified blobs; and, apart, verified manifests with their verdicts and tags.
        self.store = store
        self.manifests = manifests
        self.metrics = metrics
        # Disk IO and sendfile to clients; blob bytes move and hash in ``datapath``.
        self.hash_pool = ThreadPoolExecutor(max_workers=hash_workers, thread_name_prefix="io")
        self.datapath = DataPath()
        self.fills = FillTable(
            store=store,
            pool=self.hash_pool,
            datapath=self.datapath,
            metrics=metrics,
            complete_on_disconnect=complete_on_disconnect,
            direct_min_bytes=direct_min_bytes,
        )
        # How long a tag may resolve to its last verified digest while the upstream is
        # down (seconds; 0 = off), and how long a verdict stays good (None = forever).
        self.tag_staleness = tag_staleness
        self.verdict_ttl = verdict_ttl
        self._verified: OrderedDict[tuple[str, str, Digest], ServedManifest] = OrderedDict()
        self._offline_allowed: OrderedDict[tuple[str, str, Digest], None] = OrderedDict()
        # The node's allowances shared with sibling worker processes (None: no siblings):
        # what this worker served offline lets them serve its blobs too.
        self.shared = shared
        self._restoring: asyncio.Task[int] | None = None

    async def close(self) -> None:
        if self._restoring is not None:
            self._restoring.cancel()
            with contextlib.suppress(BaseException):
                await self._restoring
        await self.fills.close()
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.datapath.close()

    # -- manifests -----------------------------------------------------------------

    async def get_manifest(
        self, route: Route, repository: str, ref: ManifestRef, *, accept: str | None = None
    ) -> ServedManifest:
        """The manifest to serve for ``ref``: fetched once, checked, gated.

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
                    del self._verified[key]
        try:
            # Bytes fetched by digest are immutable, so remembered ones need no refetch;
            # the gate still decides every time (its verdict cache makes that cheap), so
            # a policy reload applies to them at once and blob allowances stay recorded.
            manifest = remembered or await self.fetch_manifest(
                route, repository, ref, accept=accept
            )
            verdict = await self.gate.check_manifest(
                repo, manifest, _RepoSource(self, route, repository)
            )
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            return await self._serve_stored(repo, ref, exc)
        verified_at = time.time()
        self.metrics.verdicts.labels("allow" if verdict.allowed else "deny", verdict.mode).inc()
        if not verdict.allowed:
            self.metrics.denied.labels("manifest").inc()
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
        if remembered is None:
            self._remember_verified(repo, served)
            await self._store_verified(repo, ref, served)
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
        self._verified[key] = served
        self._verified.move_to_end(key)
        while len(self._verified) > VERIFIED_MANIFEST_ENTRIES:
            self._verified.popitem(last=False)

    async def _store_verified(
        self, repo: RepoKey, ref: ManifestRef, served: ServedManifest
    ) -> None:
        """Keep an allowed manifest (and its tag) for when the upstream is down."""
        manifest, verdict = served.manifest, served.verdict
        record: dict[str, Any] = {
            "allowed": verdict.allowed,
            "reason": verdict.reason,
            "scope": verdict.scope,
            "mode": verdict.mode,
            "details": list(verdict.details),
            "verifiedAt": served.verified_at,
            "policyRevision": self._policy_revision(),
        }

        def write() -> None:
            self.manifests.put_manifest(
                manifest.digest,
                manifest.raw,
                media_type=manifest.media_type,
                repo=str(repo),
                verdict=record,
            )
            if ref.tag is not None:
                self.manifests.put_tag(str(repo), ref.tag, manifest.digest, served.verified_at)

        await asyncio.get_running_loop().run_in_executor(self.hash_pool, write)

    async def _serve_stored(
        self, repo: RepoKey, ref: ManifestRef, cause: OCIError
    ) -> ServedManifest:
        """Serve a manifest verified earlier, because the upstream is unreachable.

        1. A tag resolves to its last verified digest only within ``tag_staleness``.
        2. The stored bytes are re-checked against the digest (the store does it).
        3. Only a verdict that allowed it for this very repository counts, and only
           while it is within the verdict TTL.
        Anything else re-raises the upstream error (503/504), with the reason.
        """
        loop = asyncio.get_running_loop()
        digest = ref.digest
        if digest is None:
            assert ref.tag is not None
            if self.tag_staleness <= 0:
                raise UpstreamUnavailable(f"{TAG_STALENESS_OFF} ({cause.message})")
            tag = await loop.run_in_executor(
                self.hash_pool, self.manifests.get_tag, str(repo), ref.tag
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
        stored = await loop.run_in_executor(self.hash_pool, self.manifests.get_manifest, digest)
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
        manifest = parse_manifest(stored.raw, stored.media_type)
        details = record.get("details")
        verdict = Verdict(
            allowed=True,
            reason=str(record.get("reason", "")),
            scope=str(record.get("scope", "")),
            mode=str(record.get("mode", "enforce")),
            details=tuple(str(d) for d in details) if isinstance(details, list) else (),
        )
        for blob in manifest.blob_digests:
            key = (repo.registry, repo.repository, blob)
            self._offline_allowed[key] = None
            self._offline_allowed.move_to_end(key)
        while len(self._offline_allowed) > OFFLINE_ALLOWED_ENTRIES:
            self._offline_allowed.popitem(last=False)
        if self.shared is not None:
            self._share_offline(repo, manifest, float(verified_at))
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
            scope=_pull_scope(urepo),
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

    # -- restart continuity ---------------------------------------------------------

    @property
    def restoring(self) -> asyncio.Task[int] | None:
        """The restart restore in progress (or done), if one was started."""
        return self._restoring

    def await_restore(self, restoring: asyncio.Task[int]) -> None:
        """Treat ``restoring`` (a restore another worker process runs for the node) as
        this pipeline's own: blob requests that would be refused wait for it."""
        self._restoring = restoring

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
        self._restoring = asyncio.get_running_loop().create_task(self._restore(route_for))

    async def _restore(self, route_for: Callable[[str], Route]) -> int:
        started = time.monotonic()
        ttl = self._verdict_ttl()
        if not ttl:
            return 0  # verdicts are not kept: nothing was allowed "recently"
        since = time.time() - ttl
        loop = asyncio.get_running_loop()
        try:
            recent = await loop.run_in_executor(
                self.hash_pool, self.manifests.recent_verdicts, since, RESTORE_LIMIT
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

    # -- blobs ---------------------------------------------------------------------

    async def require_blob_allowed(self, route: Route, repository: str, digest: Digest) -> None:
        """``check_blob_allowed``, but a blob the restart restore may still allow waits
        for it (at most ``RESTORE_WAIT`` seconds) before being refused."""
        restoring = self._restoring
        if (
            restoring is not None
            and not restoring.done()
            and not self._blob_allowed(route, repository, digest)
        ):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(restoring), RESTORE_WAIT)
        self.check_blob_allowed(route, repository, digest)

    def _blob_allowed(self, route: Route, repository: str, digest: Digest) -> bool:
        repo = RepoKey(route.registry, repository)
        offline_key = (route.registry, repository, digest)
        return (
            self.gate.blob_allowed(repo, digest)
            or offline_key in self._offline_allowed
            or self._shared_offline(repo, digest)
        )

    def _share_offline(self, repo: RepoKey, manifest: Manifest, verified_at: float) -> None:
        """Let sibling workers serve the blobs of a manifest served offline here."""
        assert self.shared is not None
        try:
            self.shared.record(
                repo,
                manifest.digest,
                {OFFLINE: manifest.blob_digests},
                artifact_type=manifest.effective_artifact_type,
                fingerprint="",
                revision=self._policy_revision(),
                decided_at=verified_at,
                decision="{}",
            )
        except Exception:
            log.exception("could not share the offline allowances of %s@%s", repo, manifest.digest)

    def _shared_offline(self, repo: RepoKey, digest: Digest) -> bool:
        """A sibling served, offline and under the policy revision in force here, a
        manifest of ``repo`` that references ``digest``."""
        if self.shared is None:
            return False
        revision = self._policy_revision()
        return any(g.revision == revision for g in self.shared.grants_for(OFFLINE, repo, digest))

    def check_blob_allowed(self, route: Route, repository: str, digest: Digest) -> None:
        repo = RepoKey(route.registry, repository)
        if not self._blob_allowed(route, repository, digest):
            self.metrics.denied.labels("blob").inc()
            raise BlobNotAllowed(
                f"blob {digest} is not referenced by any verified manifest of {repo}; "
                "pull a verified manifest that references it first"
            )

    async def open_blob(
        self, route: Route, repository: str, digest: Digest, *, range_header: str | None
    ) -> BlobFile | BlobStream | FillReader:
        """Open a blob for serving: a verified local file (no upstream involved), a
        reader of the shared fill into the cache, or (no cache, no room, disk full)
        a verifying stream."""
        await self.require_blob_allowed(route, repository, digest)
        path = self.store.path_of(digest)
        if path is not None:
            try:
                return BlobFile(digest, path, path.stat().st_size)
            except FileNotFoundError:
                pass
        if self.store.caching and self.store.accepts(digest) and not self.fills.degraded:
            return await self._join_fill(route, repository, digest, range_header)
        response = await self._open_upstream_blob(route, repository, digest)
        return self._uncached_stream(route, digest, response, range_header)

    def _uncached_stream(
        self,
        route: Route,
        digest: Digest,
        response: UpstreamResponse,
        range_header: str | None,
    ) -> BlobStream:
        size: int | None = response.content_length
        try:
            byte_range = parse_range(range_header, size) if size is not None else None
        except OCIError:
            response.close()
            raise
        return BlobStream(
            pipeline=self,
            registry=route.registry,
            digest=digest,
            response=response,
            size=size,
            byte_range=byte_range,
        )

    async def _open_upstream_blob(
        self, route: Route, repository: str, digest: Digest
    ) -> UpstreamResponse:
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(f"/v2/{urepo}/blobs/{digest}", scope=_pull_scope(urepo))
        if response.status == 404:
            response.close()
            raise BlobUnknown(f"blob {digest} not found in {route.registry}/{repository}")
        return response

    async def start_fill(self, route: Route, repository: str, digest: Digest) -> Fill | Follow:
        """Start (or join) a fill of an allowed blob, holding it as one reader.

        The caller must call ``self.fills.reader_left(fill)`` when done waiting.
        """
        await self.require_blob_allowed(route, repository, digest)

        async def open_response() -> UpstreamResponse:
            return await self._open_upstream_blob(route, repository, digest)

        fill = self.fills.get_or_start(digest, route.registry, open_response)
        fill.readers += 1
        return fill

    async def _join_fill(
        self, route: Route, repository: str, digest: Digest, range_header: str | None
    ) -> BlobFile | FillReader | BlobStream:
        """Join (or start) the single upstream fetch of ``digest`` into the cache; with
        several processes on one cache, that fetch may run in another process."""

        async def open_response() -> UpstreamResponse:
            return await self._open_upstream_blob(route, repository, digest)

        reader = await self.fills.join(digest, route.registry, open_response)
        fill = reader.fill
        try:
            if fill.open_error is not None:
                raise fill.open_error
            if fill.no_room:
                # The store cannot keep it: stream uncached, on the fill's own upstream
                # response if nobody took it yet.
                response = fill.take_bypass()
                reader.close()
                if response is None:
                    response = await self._open_upstream_blob(route, repository, digest)
                return self._uncached_stream(route, digest, response, range_header)
            if fill.state == "failed":
                raise UpstreamError(f"blob {digest}: {fill.error}")
            if fill.state == "committed" and fill.final_path is not None:
                reader.close()
                return BlobFile(digest, fill.final_path, fill.size or 0)
            reader.byte_range = (
                parse_range(range_header, fill.size) if fill.size is not None else None
            )
        except BaseException:
            reader.close()
            raise
        return reader

    async def send_cached(self, blob: BlobFile, start: int, count: int, sink: BlobSink) -> None:
        """Send ``count`` bytes of a cached blob from ``start``: ``sendfile`` from the
        page cache, or for a big blob whose pages are not resident, ``O_DIRECT`` reads
        (``proxy.cache.directio``), so a 100 GB hit does not flood the page cache."""
        self.store.pin(blob.digest)
        try:
            fd = os.open(blob.path, os.O_RDONLY)
        except FileNotFoundError:
            self.store.unpin(blob.digest)
            raise StreamAborted(f"cached blob {blob.digest} vanished") from None
        try:
            direct = self.fills.direct_min_bytes
            if direct and blob.size >= direct and not resident(fd, blob.size):
                try:
                    reader = DirectReader(
                        str(blob.path), start, count, helpers=self.datapath.hashers
                    )
                except OSError:
                    reader = None  # no O_DIRECT here (tmpfs): the page cache it is
                if reader is not None:
                    send = await sink.thread_sender()
                    try:
                        await self.datapath.run(reader, lambda: reader.send(send))
                    finally:
                        reader.close()
                    self.metrics.bytes_served.labels("cache").inc(count)
                    return
            await sink.sendfile(fd, start, count)
            self.metrics.bytes_served.labels("cache").inc(count)
        finally:
            os.close(fd)
            self.store.unpin(blob.digest)

    async def head_blob(self, route: Route, repository: str, digest: Digest) -> int | None:
        """The size of an allowed blob, as the upstream (or the store) reports it."""
        await self.require_blob_allowed(route, repository, digest)
        path = self.store.path_of(digest)
        if path is not None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                pass
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(
            f"/v2/{urepo}/blobs/{digest}", scope=_pull_scope(urepo), method="HEAD"
        )
        async with response:
            if response.status == 404:
                raise BlobUnknown(f"blob {digest} not found in {route.registry}/{repository}")
            return response.content_length

    async def fetch_small_blob(
        self, route: Route, repository: str, digest: Digest, *, max_bytes: int
    ) -> bytes:
        """A size-capped, digest-checked blob for verification material."""
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(f"/v2/{urepo}/blobs/{digest}", scope=_pull_scope(urepo))
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

    # -- tags and referrers --------------------------------------------------------

    async def tags(self, route: Route, repository: str, query: str) -> tuple[bytes, str | None]:
        """The upstream tag list (and its pagination Link header), size-capped."""
        urepo = upstream_repository(route.registry, repository)
        path = f"/v2/{urepo}/tags/list" + (f"?{query}" if query else "")
        response = await route.client.get(path, scope=_pull_scope(urepo))
        async with response:
            if response.status == 404:
                from proxy.oci.errors import NameUnknown

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
        ``<alg>-<hex>`` fallback tag. Filtered by ``artifact_type`` if given."""
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(
            f"/v2/{urepo}/referrers/{digest}",
            scope=_pull_scope(urepo),
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


def _pull_scope(upstream_repo: str) -> str:
    return f"repository:{upstream_repo}:pull"


def _manifest_accept(client_accept: str | None) -> str:
    """Forward the manifest types the client accepts; default to all we can check."""
    if not client_accept:
        return mt.ACCEPT_MANIFESTS
    wanted = [part.split(";")[0].strip().lower() for part in client_accept.split(",")]
    known = [t for t in wanted if t in mt.MANIFEST_TYPES]
    return ", ".join(dict.fromkeys(known)) if known else mt.ACCEPT_MANIFESTS
