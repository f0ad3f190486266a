"""Single-flight fills: one upstream fetch per digest, shared by every reader.

A ``Fill`` downloads a blob into the store's ingest area through the shared streamer
(``proxy.pipeline.stream``), in a task of its own. Every request for that digest is a
``FillReader``: the one that started the fill (the lead) is sent each piece from
memory by the streamer's thread as it arrives; the others tail the growing ingest
file. All send everything but the last ``HOLD_BACK`` bytes of what they asked for at
once, and those only after the fill committed (digest matched, fsynced, renamed). A
failed fill fails every reader, and their connections are cut. Big blobs are written
around the page cache (``proxy.cache.directio``).

A blob the store cannot keep (bigger than the budget, disk under its floor) is not
filled: the fill ends with ``no_room`` and hands its open upstream response to one
reader, which streams it uncached; the others open their own.

Across processes sharing the cache directory, a fill is also single-flight: it runs
under the store's fill lease (``ingest/<hex>.lock``). A process that finds the lease
held follows the other process's fill instead (``proxy.pipeline.follow``); its readers
tail the same ingest file under the same hold-back rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from pathlib import Path

from proxy.cache import BlobSink, BlobStore, FillLease, SoleLease
from proxy.cache.directio import DIRECT_MIN_BYTES, IngestWriter, open_ingest
from proxy.cache.filechecks import LayerChecks
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError, StreamAborted, UpstreamTooSlow
from proxy.oci.ranges import ByteRange
from proxy.pipeline.follow import Follow
from proxy.pipeline.progress import FillProgress
from proxy.pipeline.stream import (
    HOLD_BACK,
    BodyBroken,
    DataPath,
    HeldBackSender,
    RangedBody,
    hash_and_deliver,
)
from proxy.pipeline.tarcheck import LayerPlan
from proxy.upstream.client import UpstreamResponse

log = logging.getLogger("pullgate.fill")

DISK_FULL_BACKOFF = 60.0
# How long the mover waits for a claimed lead to attach before its first piece.
LEAD_ATTACH_WAIT = 5.0
# How often a request starts over when the process it followed ended before filling.
JOIN_ATTEMPTS = 3


class FillFailed(StreamAborted):
    """A fill that did not produce a verified blob; readers must cut their clients."""


class Fill(FillProgress):
    # Only a followed fill can lose its filler before it starts (``Follow``).
    leader_gone = False

    def __init__(
        self,
        *,
        digest: Digest,
        registry: str,
        store: BlobStore,
        pool: Executor,
        datapath: DataPath,
        metrics: Metrics,
        lease: FillLease,
        direct_min_bytes: int = DIRECT_MIN_BYTES,
        plans: tuple[LayerPlan, ...] = (),
        checks: LayerChecks | None = None,
    ) -> None:
        self.digest = digest
        self.lease = lease
        # A tar layer's signed files, checked as it fills; the passes are recorded in
        # ``checks`` with the commit, so a warm hit is not parsed again.
        self.plans = plans
        self._checks = checks
        self.registry = registry
        self._store = store
        self._pool = pool
        self._datapath = datapath
        self._direct_min_bytes = direct_min_bytes
        self._metrics = metrics
        self.path: Path = store.new_ingest(digest)
        self.final_path: Path | None = None
        self.size: int | None = None
        self.written = 0
        super().__init__()
        self.error: str | None = None
        self.open_error: OCIError | None = None
        self.disk_full = False
        self.no_room = False
        # The open upstream response of a fill that found no room, for one reader to take.
        self.bypass: UpstreamResponse | None = None
        self._reserved: int | None = None
        self.readers = 0
        self.task: asyncio.Task[None] | None = None
        # The lead reader (see ``claim_lead``); the lock orders attach and delivery.
        self.lead_claimed = False
        self.lead_gone: str | None = None
        self._lead: HeldBackSender | None = None
        self._lead_lock = threading.Lock()
        self._lead_decided = threading.Event()
        self._delivered = False

    async def run(self, open_response: Callable[[], Awaitable[UpstreamResponse]]) -> None:
        try:
            response = await open_response()
        except OCIError as exc:
            self.open_error = exc
            self._fail(exc.message, count=False)
            return
        except Exception:  # a bug: never leave readers waiting on a dead fill
            log.exception("internal error opening blob %s", self.digest)
            self._fail("internal error opening the blob; see pullgate's log", count=False)
            return
        self.size = response.content_length
        if not self._store.make_room(self.size):
            self.no_room = True
            self.bypass = response
            log.warning(
                "no room in the cache for blob %s (%s bytes); serving it uncached",
                self.digest,
                self.size if self.size is not None else "unknown",
            )
            self._fail("no room in the cache", count=False)
            return
        self._reserved = self.size
        self._store.pin(self.digest)
        fd = -1
        try:
            big = (
                bool(self._direct_min_bytes)
                and self.size is not None
                and self.size >= self._direct_min_bytes
            )
            fd, direct = open_ingest(str(self.path), direct=big)
            self.lease.publish(self.path, self.size)
            self.state = "running"
            self._notify()
            await self._download(response, fd, direct=direct)
        except asyncio.CancelledError:
            self._fail("fill cancelled: every reader went away", count=False)
            raise
        except FillFailed as exc:
            self._fail(str(exc), count=False)
        except OSError as exc:
            self.disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._fail(f"cache write failed: {exc.strerror}", count=False)
        except Exception:
            log.exception("internal error filling blob %s", self.digest)
            self._fail("internal error while filling; see pullgate's log", count=False)
        finally:
            response.close()
            if fd >= 0:
                os.close(fd)
            if self.state != "committed":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                # A commit that failed half-way must not leave the state "running".
                if not self.done:
                    self._fail(self.error or "fill ended without a verified blob", count=False)
            self._release()
            self._store.unpin(self.digest)

    def _release(self) -> None:
        if self._reserved is not None:
            self._store.release(self._reserved)
            self._reserved = None

    def take_bypass(self) -> UpstreamResponse | None:
        """The open upstream response of a no-room fill, to the first caller only."""
        response, self.bypass = self.bypass, None
        return response

    def open_for_read(self) -> int:
        """A descriptor of the fill's file for one reader (closed by the reader)."""
        path = self.final_path if self.state == "committed" else self.path
        assert path is not None
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    async def _download(self, response: UpstreamResponse, fd: int, *, direct: bool) -> None:
        """Stream the body into the ingest file through the shared streamer, then
        fsync and commit it. The mover thread writes each piece (``IngestWriter``)
        and sends it to the lead reader, if one attached (``attach_lead``)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        writer = IngestWriter(fd, direct=direct, write_at=_write_at)
        try:
            body = response.body_reader()
        except OCIError as exc:
            writer.close()
            self._metrics.upstream_truncated.labels(self.registry).inc()
            raise FillFailed(exc.message) from None

        def deliver(piece: memoryview, offset: int) -> None:
            lead = self._lead_for(offset)
            in_file = writer.write(piece)
            if in_file > offset:
                # Readers may send what is in the file as soon as it is there.
                loop.call_soon_threadsafe(self._advance, in_file)
            if lead is not None:
                try:
                    lead(piece, offset)
                except ConnectionError as exc:  # the lead's client left: the fill goes on
                    with self._lead_lock:
                        self._lead = None
                    loop.call_soon_threadsafe(self._lead_left, str(exc))

        def move() -> int:
            received = hash_and_deliver(
                digest=self.digest,
                size=self.size,
                body=body,
                deliver=deliver,
                hashers=self._datapath.hashers,
                plans=self.plans,
            )
            writer.finish()
            return received

        try:
            received = await self._datapath.run(body, move)
        except BodyBroken as exc:
            # A transport's bytes that fail a plan are its corruption, not the layer's:
            # remembering the refusal would refuse the origin's good bytes later.
            if exc.refused is not None and self._checks is not None and response.trusted:
                self._checks.refuse(self.digest, exc.refused, exc.reason)
                self._metrics.layer_file_checks.labels("refused").inc()
            counter = self._metrics.upstream_truncated if exc.truncated else None
            (counter or self._metrics.digest_mismatch).labels(self.registry).inc()
            response.report_broken(truncated=exc.truncated)  # a transport is marked bad
            raise FillFailed(f"{exc.reason} (from {response.source})") from None
        except OCIError as exc:
            self._metrics.upstream_truncated.labels(self.registry).inc()
            slow = isinstance(exc, UpstreamTooSlow)
            if slow:
                refused = self._metrics.upstream_bodies_refused
                refused.labels(self.registry, response.source, "slow").inc()
            response.report_broken(truncated=True, slow=slow)
            raise FillFailed(f"{exc.message} (from {response.source})") from None
        finally:
            body.close()
            writer.close()
        self._metrics.upstream_bytes.labels(self.registry).inc(received)
        self._metrics.fill_bytes.labels("direct").inc(writer.direct_bytes)
        self._metrics.fill_bytes.labels("page_cache").inc(received - writer.direct_bytes)
        await loop.run_in_executor(self._pool, os.fsync, fd)
        self._release()
        if self.plans and self._checks is not None:
            # Before the commit: a process that finds the blob must find the fact too.
            for plan in self.plans:
                self._checks.record_pass(self.digest, plan)
            self._metrics.layer_file_checks.labels("passed").inc()
        self.final_path = self._store.commit(self.digest, self.path, received)
        self.size = received
        self.written = received
        self.state = "committed"
        self._notify()
        elapsed = time.perf_counter() - started
        log.info(
            "cached blob %s: %d bytes in %.2fs (%.0f MB/s)",
            self.digest,
            received,
            elapsed,
            received / max(elapsed, 1e-9) / 1e6,
        )

    def _advance(self, written: int) -> None:
        if written > self.written and not self.done:
            self.written = written
            self._notify()

    # -- the lead reader: fed from memory by the mover thread ----------------------

    def claim_lead(self) -> bool:
        """The first reader of a fill that has delivered nothing yet leads: the mover
        sends it each piece as it arrives, so its bytes never wait for the disk."""
        if self.lead_claimed or self.done:
            return False
        with self._lead_lock:
            if self._delivered:
                return False
            self.lead_claimed = True
        return True

    def attach_lead(self, sender: HeldBackSender) -> bool:
        """Attach the lead's client; False if the mover already passed the start
        (the lead then reads the file like any other reader)."""
        with self._lead_lock:
            attached = not self._delivered
            if attached:
                self._lead = sender
        self._lead_decided.set()
        return attached

    def decline_lead(self) -> None:
        """The lead will not attach (it left, or asked for no body)."""
        self._lead_decided.set()

    def _lead_for(self, offset: int) -> HeldBackSender | None:
        """In the mover thread: the lead to send this piece to. Before the first piece,
        wait (briefly) for a claimed lead to attach or decline."""
        if not self._delivered and self.lead_claimed:
            self._lead_decided.wait(LEAD_ATTACH_WAIT)
        with self._lead_lock:
            self._delivered = True
            return self._lead

    def _lead_left(self, reason: str) -> None:
        self.lead_gone = reason
        self._notify()

    def _fail(self, reason: str, *, count: bool) -> None:
        self.state = "failed"
        self.error = reason
        if self.open_error is None and not self.no_room:
            log.error(
                "fill of blob %s from %s failed: %s; every reader's connection is cut",
                self.digest,
                self.registry,
                reason,
            )
        self._notify()


def _write_at(fd: int, piece: memoryview, offset: int) -> None:
    while piece:
        count = os.pwrite(fd, piece, offset)
        piece, offset = piece[count:], offset + count


class FillTable:
    """The in-flight fills of one app: one per digest, owned by the pipeline."""

    def __init__(
        self,
        *,
        store: BlobStore,
        pool: Executor,
        metrics: Metrics,
        complete_on_disconnect: bool,
        datapath: DataPath | None = None,
        direct_min_bytes: int = DIRECT_MIN_BYTES,
    ) -> None:
        self._store = store
        self._pool = pool
        # A table built without the pipeline's data path owns one of its own.
        # Fills of blobs this big or bigger bypass the page cache (0: never).
        self.direct_min_bytes = direct_min_bytes
        self._own_datapath = datapath is None
        self._datapath = datapath or DataPath()
        self._metrics = metrics
        self.complete_on_disconnect = complete_on_disconnect
        self._fills: dict[Digest, Fill | Follow] = {}
        self._disk_full_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def degraded(self) -> bool:
        """True for a while after the disk filled up: serve uncached meanwhile."""
        return time.monotonic() < self._disk_full_until

    def __len__(self) -> int:
        return len(self._fills)

    def get_or_start(
        self,
        digest: Digest,
        registry: str,
        open_response: Callable[[], Awaitable[UpstreamResponse]],
        *,
        plans: tuple[LayerPlan, ...] = (),
        checks: LayerChecks | None = None,
    ) -> Fill | Follow:
        """The fill of ``digest`` in progress here, or a new one: this process's own
        if it gets the store's fill lease, else a ``Follow`` of the process that has it.
        A fill of a layer with ``plans`` checks its files as it goes; a reader whose
        plans the fill does not check has them checked before its tail (``FillReader``)."""
        fill = self._fills.get(digest)
        if fill is not None and not fill.done:
            self._metrics.fill_joins.inc()
            return fill
        lease: FillLease | None
        try:
            lease = self._store.claim_fill(digest)
        except OSError as exc:
            # Without the lock file another process might fill it too: a wasted
            # download at worst (both verify, the commit is the same bytes).
            log.warning("cannot take the fill lock of blob %s: %s", digest, exc)
            lease = SoleLease()
        if lease is None:
            self._metrics.fill_joins.inc()
            follow = Follow(digest=digest, files=self._store.fill_files(digest))
            self._start(follow, self._follow(follow))
            return follow
        stored = self._store.path_of(digest)
        if stored is not None:
            # Another process committed it between our lookup and our claim.
            lease.release()
            return Follow.of_committed(digest=digest, path=stored, size=stored.stat().st_size)
        fill = Fill(
            digest=digest,
            registry=registry,
            store=self._store,
            pool=self._pool,
            datapath=self._datapath,
            metrics=self._metrics,
            lease=lease,
            direct_min_bytes=self.direct_min_bytes,
            plans=plans,
            checks=checks,
        )
        task = self._start(fill, self._run(fill, open_response))
        # A task cancelled before it ran never reaches ``_run``'s cleanup.
        task.add_done_callback(lambda _: lease.release())
        return fill

    def _start(self, fill: Fill | Follow, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        self._fills[fill.digest] = fill
        task = asyncio.get_running_loop().create_task(work)
        fill.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def join(
        self,
        digest: Digest,
        registry: str,
        open_response: Callable[[], Awaitable[UpstreamResponse]],
        *,
        plans: tuple[LayerPlan, ...] = (),
        checks: LayerChecks | None = None,
        before_tail: Callable[[Path], Awaitable[None]] | None = None,
    ) -> FillReader:
        """Join (or start) the fill of ``digest`` as one reader, once it started.

        A followed fill whose process ended before it started writing (its upstream
        failed, it had no room, it died) is joined afresh: this process may fill now,
        or open the upstream itself and learn why.
        """
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            fill = self.get_or_start(digest, registry, open_response, plans=plans, checks=checks)
            # Count this reader before waiting, so the fill is not abandoned meanwhile.
            reader = FillReader(
                fill=fill, table=self, byte_range=None, pool=self._pool, before_tail=before_tail
            )
            try:
                await fill.wait_started()
            except BaseException:
                reader.close()
                raise
            if fill.leader_gone and attempt < JOIN_ATTEMPTS:
                reader.close()
                continue
            reader.size = fill.size
            return reader
        raise AssertionError("unreachable")  # the last attempt always returns

    async def _run(
        self, fill: Fill, open_response: Callable[[], Awaitable[UpstreamResponse]]
    ) -> None:
        try:
            await fill.run(open_response)
        finally:
            # The lease goes before the table entry: a new request for this digest must
            # not find our own lease still held and follow ourselves.
            fill.lease.release()
            if fill.disk_full:
                self._disk_full_until = time.monotonic() + DISK_FULL_BACKOFF
                log.error("cache disk is full; serving uncached for %.0fs", DISK_FULL_BACKOFF)
            if self._fills.get(fill.digest) is fill:
                del self._fills[fill.digest]

    async def _follow(self, follow: Follow) -> None:
        try:
            await follow.run()
        finally:
            if self._fills.get(follow.digest) is follow:
                del self._fills[follow.digest]

    def reader_left(self, fill: Fill | Follow) -> None:
        fill.readers -= 1
        if fill.readers <= 0:
            # A no-room hand-off nobody took: free the upstream connection.
            unclaimed = fill.take_bypass()
            if unclaimed is not None:
                unclaimed.close()
        # Completing on disconnect is the filling process's business: a follower with
        # no reader left has nothing to do.
        keep = self.complete_on_disconnect and isinstance(fill, Fill)
        abandoned = fill.readers <= 0 and not fill.done and not keep
        if abandoned and fill.task is not None:
            fill.task.cancel()

    async def close(self) -> None:
        for fill in list(self._fills.values()):
            unclaimed = fill.take_bypass()
            if unclaimed is not None:
                unclaimed.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._own_datapath:
            self._datapath.close()


class FillReader(RangedBody):
    """One client's view of a fill: tails the ingest file, holds back its tail."""

    def __init__(
        self,
        *,
        fill: Fill | Follow,
        table: FillTable,
        byte_range: ByteRange | None,
        pool: Executor,
        before_tail: Callable[[Path], Awaitable[None]] | None = None,
    ) -> None:
        self.fill = fill
        self.digest = fill.digest
        # Awaited with the committed file before the held-back tail goes out; raises
        # to refuse it (a tar layer's plans that the fill itself did not check).
        self._before_tail = before_tail
        self._table = table
        self.byte_range = byte_range
        self._pool = pool
        self.size = fill.size
        fill.readers += 1
        self._closed = False
        self._lead = fill.claim_lead()

    async def send_to(self, sink: BlobSink) -> None:
        """Send the (ranged) body as the fill gets it: the lead from memory, the
        others zero-copy from the ingest file. Either way the last ``HOLD_BACK``
        bytes go out only after the fill committed."""
        if self._lead:
            sender = HeldBackSender(
                await sink.thread_sender(), byte_range=self.byte_range, size=self.size
            )
            if self.fill.attach_lead(sender):
                try:
                    await self._lead_to_end(sender)
                finally:
                    self.close()
                return
        await self._tail_file(sink)

    async def _lead_to_end(self, sender: HeldBackSender) -> None:
        fill = self.fill
        while not fill.done and fill.lead_gone is None:
            await fill.wait_change()
        if fill.lead_gone is not None:
            raise ConnectionResetError(fill.lead_gone)
        if fill.state != "committed":
            raise FillFailed(fill.error or "fill failed")
        await self._committed()
        await asyncio.get_running_loop().run_in_executor(self._pool, sender.release)
        served = self.content_length or fill.size or 0
        self._table._metrics.bytes_served.labels("fill_memory").inc(served)

    async def _tail_file(self, sink: BlobSink) -> None:
        fill = self.fill
        offset = self.byte_range.start if self.byte_range else 0
        stop = (self.byte_range.end + 1) if self.byte_range else self.size  # exclusive
        fd = -1
        try:
            try:
                fd = fill.open_for_read()
            except FileNotFoundError:
                # The fill failed (ingest removed) or the blob left the store meanwhile.
                raise FillFailed(
                    f"blob {fill.digest}: {fill.error or 'its cache file vanished'}"
                ) from None
            while True:
                if fill.state == "failed":
                    raise FillFailed(fill.error or "fill failed")
                committed = fill.state == "committed"
                end = stop if stop is not None else (fill.size if committed else None)
                if committed:
                    assert end is not None
                    await self._committed()
                    safe = end
                else:
                    limit = fill.written if end is None else min(fill.written, end)
                    tail_start = (fill.written if end is None else end) - HOLD_BACK
                    safe = min(limit, tail_start)
                if safe > offset:
                    await sink.sendfile(fd, offset, safe - offset)
                    offset = safe
                    continue
                if committed:
                    break
                await fill.wait_change()
            self._table._metrics.bytes_served.labels("fill").inc(
                self.content_length or fill.size or 0
            )
        finally:
            if fd >= 0:
                os.close(fd)
            self.close()

    async def _committed(self) -> None:
        """The fill committed: run ``before_tail`` once, on the committed file."""
        check, self._before_tail = self._before_tail, None
        if check is not None:
            path = self.fill.final_path
            if path is None:
                raise FillFailed(f"blob {self.digest}: its committed file is unknown")
            await check(path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._lead:
                self.fill.decline_lead()
            self._table.reader_left(self.fill)
