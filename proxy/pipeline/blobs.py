"""The blob path of a pull: ask the allowances, then serve from the store, join the
single fill into the cache, or stream from the upstream, hashing inline and holding
the tail back until the digest matches.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from proxy.cache import BlobSink, BlobStore
from proxy.cache.directio import DirectReader, resident
from proxy.cache.filechecks import LayerChecks
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import (
    BlobUnknown,
    LayerRefused,
    OCIError,
    StreamAborted,
    UpstreamError,
    UpstreamTooSlow,
)
from proxy.oci.ranges import ByteRange, parse_range
from proxy.oci.reference import upstream_repository
from proxy.pipeline.allowances import BlobAllowances
from proxy.pipeline.fills import Fill, FillReader, FillTable
from proxy.pipeline.follow import Follow
from proxy.pipeline.gate import RepoKey
from proxy.pipeline.stream import (
    BodyBroken,
    DataPath,
    HeldBackSender,
    RangedBody,
    hash_and_deliver,
)
from proxy.pipeline.tarcheck import LayerCheck, LayerPlan, TarRefused
from proxy.upstream.auth import pull_scope
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.router import Route

log = logging.getLogger("pullgate.pipeline")


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A verified blob on local disk: served with sendfile."""

    digest: Digest
    path: Path
    size: int


class BlobStream(RangedBody):
    """A blob streamed from the upstream, hashed inline, tail held back."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        datapath: DataPath,
        registry: str,
        digest: Digest,
        response: UpstreamResponse,
        size: int | None,
        byte_range: ByteRange | None,
        plans: tuple[LayerPlan, ...] = (),
        checks: LayerChecks | None = None,
    ) -> None:
        self._metrics = metrics
        self._datapath = datapath
        self._registry = registry
        self.digest = digest
        self._response = response
        self.size = size
        self.byte_range = byte_range
        # A tar layer's signed files, checked as it streams (none: not a checked layer).
        self._plans = plans
        self._checks = checks

    async def send_to(self, sink: BlobSink) -> None:
        """Send the (ranged) body. The last ``HOLD_BACK`` bytes go out only once the
        whole blob hashed to its digest; on mismatch or truncation ``StreamAborted``
        is raised instead, and the caller must abort the client connection."""
        metrics = self._metrics
        datapath = self._datapath
        sender = HeldBackSender(
            await sink.thread_sender(), byte_range=self.byte_range, size=self.size
        )
        try:
            body = self._response.body_reader()
        except OCIError as exc:
            self._response.close()
            raise self._broken(exc.message, truncated=True) from None

        def move() -> int:
            received = hash_and_deliver(
                digest=self.digest,
                size=self.size,
                body=body,
                deliver=sender,
                hashers=datapath.hashers,
                plans=self._plans,
            )
            sender.release()
            return received

        metrics.streams_active.inc()
        try:
            received = await datapath.run(body, move)
        except BodyBroken as exc:
            # A transport's bytes that fail a plan are its corruption, not the layer's.
            trusted = self._response.trusted
            if exc.refused is not None and self._checks is not None and trusted:
                self._checks.refuse(self.digest, exc.refused, exc.reason)
                metrics.layer_file_checks.labels("refused").inc()
            raise self._broken(exc.reason, truncated=exc.truncated) from None
        except OCIError as exc:
            slow = isinstance(exc, UpstreamTooSlow)
            raise self._broken(exc.message, truncated=True, slow=slow) from None
        finally:
            body.close()
            metrics.streams_active.dec()
            self._response.close()
        if self._plans:
            metrics.layer_file_checks.labels("passed").inc()
        metrics.upstream_bytes.labels(self._registry).inc(received)
        served = self.byte_range.length if self.byte_range else received
        metrics.bytes_served.labels("upstream").inc(served)

    def _broken(self, reason: str, *, truncated: bool, slow: bool = False) -> StreamAborted:
        metrics = self._metrics
        if truncated:
            metrics.upstream_truncated.labels(self._registry).inc()
        else:
            metrics.digest_mismatch.labels(self._registry).inc()
        if slow:
            source = self._response.source
            metrics.upstream_bodies_refused.labels(self._registry, source, "slow").inc()
        # A transport is marked bad.
        self._response.report_broken(truncated=truncated, slow=slow)
        log.error(
            "aborting blob %s from %s (%s): %s; the client connection is cut so no "
            "complete wrong body is delivered",
            self.digest,
            self._registry,
            self._response.source,
            reason,
        )
        return StreamAborted(f"blob {self.digest}: {reason}")

    def close(self) -> None:
        self._response.close()


class _Uncancellable:
    """A local file check stops on its own, soon: nothing to cancel."""

    def cancel(self) -> None:
        pass


class BlobPath:
    """Blobs: the blob half of the pipeline."""

    def __init__(
        self,
        *,
        store: BlobStore,
        fills: FillTable,
        datapath: DataPath,
        metrics: Metrics,
        io: Executor,
        allowances: BlobAllowances,
        checks: LayerChecks | None = None,
    ) -> None:
        self.store = store
        self.fills = fills
        self.datapath = datapath
        self.metrics = metrics
        self.hash_pool = io
        self._allowances = allowances
        # Plans of tar layers whose files a verified signature lists, and their facts.
        self.checks = checks or LayerChecks()

    async def open_blob(
        self, route: Route, repository: str, digest: Digest, *, range_header: str | None
    ) -> BlobFile | BlobStream | FillReader:
        """Open a blob for serving: a verified local file (no upstream involved), a
        reader of the shared fill into the cache, or (no cache, no room, disk full)
        a verifying stream."""
        await self._allowances.require(route, repository, digest)
        plans = self._plans_for(route, repository, digest)
        path = self.store.path_of(digest)
        if path is not None:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                pass
            else:
                if plans and not await self._check_cached(digest, path, plans):
                    self.metrics.layer_file_checks.labels("skipped").inc()
                return BlobFile(digest, path, size)
        if self.store.caching and self.store.accepts(digest) and not self.fills.degraded:
            return await self._join_fill(route, repository, digest, range_header)
        response = await self._open_upstream_blob(route, repository, digest)
        return self._uncached_stream(route, digest, response, range_header, plans)

    def _plans_for(self, route: Route, repository: str, digest: Digest) -> tuple[LayerPlan, ...]:
        """The per-file plans of layer ``digest`` in this repository; a layer that
        already failed one is refused at once, naming the file."""
        try:
            plans = self.checks.plans_for(RepoKey(route.registry, repository), digest)
        except ValueError:
            # Fail closed: the next verification of its manifest writes the plan again.
            self.metrics.denied.labels("blob", "mirror").inc()
            raise LayerRefused(
                f"layer {digest}: its per-file plan is unreadable; pull its manifest again"
            ) from None
        for plan in plans:
            reason = self.checks.refusal(digest, plan)
            if reason is not None:
                raise self._refused(digest, plan, reason)
        return plans

    def _refused(self, digest: Digest, plan: LayerPlan, reason: str) -> LayerRefused:
        self.metrics.denied.labels("blob", "mirror").inc()
        source = f" (signed by {plan.source})" if plan.source else ""
        return LayerRefused(f"layer {digest}: {reason}{source}")

    async def _check_cached(self, digest: Digest, path: Path, plans: tuple[LayerPlan, ...]) -> bool:
        """Before a cached (or just filled) layer is served: every plan it has must
        have passed; one that did not (the layer was cached before that signature
        named it, or a fill checked other plans) is checked from disk now. Whether a
        check ran."""
        unchecked = tuple(plan for plan in plans if not self.checks.passed(digest, plan))
        if not unchecked:
            return False

        def check() -> None:
            layer = LayerCheck(unchecked)
            with open(path, "rb") as blob:
                while piece := blob.read(1024 * 1024):
                    layer.feed(piece)
            layer.finish()

        log.info("checking stored layer %s against %d per-file plan(s)", digest, len(unchecked))
        self.store.pin(digest)
        try:
            await self.datapath.run(_Uncancellable(), check)
        except TarRefused as exc:
            plan = exc.plan or unchecked[0]
            self.checks.refuse(digest, plan, exc.reason)
            self.metrics.layer_file_checks.labels("refused").inc()
            raise self._refused(digest, plan, exc.reason) from None
        finally:
            self.store.unpin(digest)
        for plan in unchecked:
            self.checks.record_pass(digest, plan)
        self.metrics.layer_file_checks.labels("passed").inc()
        return True

    def _uncached_stream(
        self,
        route: Route,
        digest: Digest,
        response: UpstreamResponse,
        range_header: str | None,
        plans: tuple[LayerPlan, ...],
    ) -> BlobStream:
        size: int | None = response.content_length
        try:
            byte_range = parse_range(range_header, size) if size is not None else None
        except OCIError:
            response.close()
            raise
        return BlobStream(
            metrics=self.metrics,
            datapath=self.datapath,
            registry=route.registry,
            digest=digest,
            response=response,
            size=size,
            byte_range=byte_range,
            plans=plans,
            checks=self.checks,
        )

    async def _open_upstream_blob(
        self, route: Route, repository: str, digest: Digest
    ) -> UpstreamResponse:
        urepo = upstream_repository(route.registry, repository)
        # Through the registry's transports first, if it has any (proxy.upstream.transports),
        # bound to the size the verified manifest gives the blob: a length other than
        # that is refused before any byte goes out, and a body without one is cut past
        # it. Not known (allow-all without the manifest passing here): the upstream's
        # length bounds it, as it always did.
        path = f"/v2/{urepo}/blobs/{digest}"
        expected = self._allowances.expected_sizes(route, repository, digest)
        response = await route.client.get_blob(
            path, scope=pull_scope(urepo), expected_sizes=expected
        )
        if response.status == 404:
            response.close()
            raise BlobUnknown(f"blob {digest} not found in {route.registry}/{repository}")
        if response.content_length is None:
            # Neither the upstream nor a verified manifest says how long it is: nothing
            # would bound the body, and the client could not be told where it ends.
            response.close()
            raise UpstreamError(
                f"the upstream sent blob {digest} without a Content-Length, and no "
                "verified manifest served here gives its size (pull the manifest first)"
            )
        return response

    async def start_fill(self, route: Route, repository: str, digest: Digest) -> Fill | Follow:
        """Start (or join) a fill of an allowed blob, holding it as one reader.

        The caller must call ``self.fills.reader_left(fill)`` when done waiting.
        """
        await self._allowances.require(route, repository, digest)

        async def open_response() -> UpstreamResponse:
            return await self._open_upstream_blob(route, repository, digest)

        fill = self.fills.get_or_start(
            digest,
            route.registry,
            open_response,
            plans=self._plans_for(route, repository, digest),
            checks=self.checks,
        )
        fill.readers += 1
        return fill

    async def _join_fill(
        self, route: Route, repository: str, digest: Digest, range_header: str | None
    ) -> BlobFile | FillReader | BlobStream:
        """Join (or start) the single upstream fetch of ``digest`` into the cache; with
        several processes on one cache, that fetch may run in another process."""

        async def open_response() -> UpstreamResponse:
            return await self._open_upstream_blob(route, repository, digest)

        plans = self._plans_for(route, repository, digest)

        async def before_tail(path: Path) -> None:
            await self._check_cached(digest, path, plans)

        reader = await self.fills.join(
            digest,
            route.registry,
            open_response,
            plans=plans,
            checks=self.checks,
            before_tail=before_tail if plans else None,
        )
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
                return self._uncached_stream(route, digest, response, range_header, plans)
            if fill.state == "failed":
                self._plans_for(route, repository, digest)  # refused by its check: say so
                raise UpstreamError(f"blob {digest}: {fill.error}")
            if fill.state == "committed" and fill.final_path is not None:
                reader.close()
                await self._check_cached(digest, fill.final_path, plans)
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
        await self._allowances.require(route, repository, digest)
        path = self.store.path_of(digest)
        if path is not None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                pass
        urepo = upstream_repository(route.registry, repository)
        response = await route.client.get(
            f"/v2/{urepo}/blobs/{digest}", scope=pull_scope(urepo), method="HEAD"
        )
        async with response:
            if response.status == 404:
                raise BlobUnknown(f"blob {digest} not found in {route.registry}/{repository}")
            expected = self._allowances.expected_sizes(route, repository, digest)
            if expected:
                response.expect_length(expected, what=f"blob {digest}")
            return response.content_length
