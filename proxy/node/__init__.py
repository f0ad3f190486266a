"""The one place that wires a running pullgate.

``Node.build`` turns the validated config into the parts that need no event loop: the
metrics, the gate (it loads the policy), the store (it recovers the cache directory),
the pipeline and the policy watcher. ``Node.running()`` is their lifetime: it opens the
upstream session and the router, starts the background tasks (policy watcher, cache
scrub, restart restore, gauge sampling), and stops all of it on the way out, in reverse
order. The front ends (``proxy.http``, ``proxy.cri``) are handed these parts and hold
only handlers and middleware.

``serve`` runs one serving process until SIGTERM or SIGINT, then stops gracefully and
returns 0: the only process with ``--workers 1``, or one of N under
``proxy.node.supervisor``. With N workers, each one binds the registry and admin ports with
``SO_REUSEPORT`` (the kernel spreads new connections over them) and shares the node's
allowances and metrics through the supervisor's runtime directory; the CRI socket, the
cache scrub and the restart restore run in worker 0 only (a unix socket cannot be
shared that way, and the others are node-wide chores).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import __version__
from proxy.cache import BlobStore, NoStore
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.cache.scrub import scrub_forever
from proxy.cache.verified import NoVerifiedManifests, VerifiedManifestStore
from proxy.cache.verified_disk import DiskVerifiedManifests
from proxy.config import Config
from proxy.http.admin import build_admin_app
from proxy.http.app import build_app
from proxy.metrics import Metrics
from proxy.node.policy_snapshot import Snapshot, load_snapshot, take_snapshot
from proxy.pipeline import Pipeline
from proxy.pipeline.gate import AllowAllGate, Gate
from proxy.pipeline.shared import SharedAllowances
from proxy.upstream.router import UpstreamRouter
from proxy.upstream.session import new_upstream_session
from proxy.verify.base import PolicyError
from proxy.verify.policy import Policy, load_policy
from proxy.verify.reload import PolicyWatcher
from proxy.verify.signature_gate import COVERED, SignatureGate

if TYPE_CHECKING:
    from grpc import aio as grpc_aio

log = logging.getLogger("pullgate")

# In the supervisor's runtime directory.
ALLOWANCES_FILE = "allowances.db"
METRICS_DIR = "metrics"
TRANSPORT_MARKS_DIR = "transports"

# Seconds in-flight requests get to finish after SIGTERM (then they are cut; containerd
# resumes a cut blob with a Range request).
SHUTDOWN_GRACE = 20.0
# containerd sends a pod's pull grant (its labels and credentials, sealed, base64'd
# twice) in one Authorization header: more than aiohttp's 8 KiB default for a pod
# with many labels or a cloud registry's long token. Fewer headers keep the most one
# request's headers may hold near the default's (128 x 8 KiB).
MAX_HEADER_FIELD = 32 * 1024
MAX_HEADERS = 64
# How often each worker samples its gauges into the shared metrics files.
GAUGE_INTERVAL = 1.0
# How often a worker polls the shared restore marker while worker 0 restores.
RESTORE_POLL = 0.1


@dataclass(frozen=True, slots=True)
class Role:
    """Which serving process this is."""

    index: int = 0
    workers: int = 1
    runtime_dir: Path | None = None
    """The supervisor's private directory (shared allowances, metrics); N > 1 only."""
    grant_key: bytes | None = None
    """The key pull grants are sealed with, the same in every worker (None: one
    process, which makes its own)."""

    @property
    def primary(self) -> bool:
        """Worker 0: serves the CRI socket, runs the scrub and the restart restore."""
        return self.index == 0

    @property
    def shared(self) -> bool:
        return self.workers > 1


@dataclass(frozen=True, slots=True)
class CriEndpoints:
    """``--cri-listen`` and the runtime's ImageService it forwards to."""

    listen: str
    runtime: str


def build_gate(
    config: Config,
    metrics: Metrics,
    shared: SharedAllowances | None = None,
    policy: Policy | None = None,
) -> Gate:
    """The signature gate for ``policy`` (else ``config.policy``, loaded now);
    allow-all, loudly, only when the config names no policy."""
    if config.policy is None:
        log.warning(
            "no --policy given: serving everything UNVERIFIED (allow-all). "
            "Give a policy to verify signatures."
        )
        return AllowAllGate()
    if policy is None:
        policy = load_policy(config.policy)
    return SignatureGate(policy, metrics=metrics, shared=shared)


def load_node_policy(path: Path, role: Role) -> tuple[Policy, Snapshot | None]:
    """The policy file, or for a worker of several whose file does not load, the
    supervisor's snapshot of the last good policy (which snapshot it is, second).

    PolicyError when neither loads: a broken file never means serving with no policy.
    """
    try:
        return load_policy(path), None
    except PolicyError as broken:
        if not role.shared or role.runtime_dir is None:
            raise
        try:
            snapshot = load_snapshot(role.runtime_dir)
        except PolicyError as damaged:
            raise PolicyError(f"{broken}; and {damaged}") from broken
        if snapshot is None:
            raise
        log.error(
            "policy file %s does not load: serving the last good policy snapshot, %s, "
            "until the file loads again. The file's problem: %s",
            path,
            snapshot.describe(),
            broken,
        )
        return snapshot.policy, snapshot


def _keep_snapshot(runtime: Path, path: Path, raw: bytes, read_at: float) -> None:
    take_snapshot(runtime, path, raw, read_at=read_at)


def build_stores(config: Config) -> tuple[BlobStore, VerifiedManifestStore]:
    """The blob store and the verified-manifest store, both under ``--cache-dir``
    (nothing kept without one)."""
    cache = config.cache
    if cache.dir is None:
        return NoStore(), NoVerifiedManifests()
    store = DiskBlobStore(
        root=cache.dir,
        limits=CacheLimits(
            max_bytes=cache.max_bytes,
            high_watermark=cache.high_watermark,
            low_watermark=cache.low_watermark,
            min_free_bytes=cache.min_free_bytes,
        ),
    )
    store.recover()
    manifests = DiskVerifiedManifests(root=cache.dir)
    manifests.recover()
    return store, manifests


class Node:
    """Everything one serving process runs, built once and started and stopped together."""

    def __init__(
        self,
        *,
        config: Config,
        role: Role,
        metrics: Metrics,
        gate: Gate,
        store: BlobStore,
        pipeline: Pipeline,
        shared: SharedAllowances | None,
        watcher: PolicyWatcher | None,
    ) -> None:
        self.config = config
        self.role = role
        self.metrics = metrics
        self.gate = gate
        self.store = store
        self.pipeline = pipeline
        self.shared = shared
        self.watcher = watcher
        self._router: UpstreamRouter | None = None
        metrics.add_refresher(self.sample_gauges)

    @classmethod
    def build(
        cls,
        config: Config,
        role: Role | None = None,
        *,
        gate: Gate | None = None,
        store: BlobStore | None = None,
        manifests: VerifiedManifestStore | None = None,
    ) -> Node:
        """Build the parts; raises ``PolicyError`` if the policy does not load.

        ``gate``, ``store`` and ``manifests`` replace what the config would build (tests).
        """
        role = role or Role()
        metrics = Metrics(worker=role.index)
        metrics.build_info.labels(__version__).set(1)
        if config.cache.dir is not None:
            metrics.cache_capacity.set(config.cache.max_bytes)
        shared: SharedAllowances | None = None
        if role.shared and config.policy is not None and gate is None:
            if role.runtime_dir is None:
                raise ValueError("a worker of several needs the supervisor's runtime dir")
            shared = SharedAllowances(
                role.runtime_dir / ALLOWANCES_FILE, covered_fingerprint=COVERED
            )
        snapshot: Snapshot | None = None
        if gate is None:
            try:
                policy = None
                if config.policy is not None:
                    policy, snapshot = load_node_policy(config.policy, role)
                gate = build_gate(config, metrics, shared, policy)
            except BaseException:
                if shared is not None:
                    shared.close()
                raise
        if store is None or manifests is None:
            built_store, built_manifests = build_stores(config)
            store = store if store is not None else built_store
            manifests = manifests if manifests is not None else built_manifests
        pipeline = Pipeline(
            gate=gate,
            store=store,
            manifests=manifests,
            metrics=metrics,
            complete_on_disconnect=config.cache.complete_on_disconnect,
            direct_min_bytes=config.cache.direct_min_bytes,
            tag_staleness=config.cache.tag_staleness,
            shared=shared,
            private_marks=config.cache.dir / "private" if config.cache.dir else None,
            grant_key=role.grant_key,
            layer_checks_dir=_layer_checks_dir(config, role),
        )
        watcher = None
        if isinstance(gate, SignatureGate) and config.policy is not None:
            on_loaded = None
            if role.shared and role.runtime_dir is not None:
                # A revision this worker puts into force is the last good one, even if
                # the file breaks again before the supervisor's next poll.
                on_loaded = functools.partial(_keep_snapshot, role.runtime_dir, config.policy)
            watcher = PolicyWatcher(
                path=config.policy,
                gate=gate,
                metrics=metrics,
                snapshot=snapshot.describe() if snapshot is not None else None,
                on_loaded=on_loaded,
            )
        return cls(
            config=config,
            role=role,
            metrics=metrics,
            gate=gate,
            store=store,
            pipeline=pipeline,
            shared=shared,
            watcher=watcher,
        )

    @property
    def router(self) -> UpstreamRouter:
        """The upstream router (only while ``running``)."""
        if self._router is None:
            raise RuntimeError("the node is not running")
        return self._router

    def sample_gauges(self) -> None:
        """Set the gauges that are sampled rather than counted."""
        metrics, store = self.metrics, self.store
        if isinstance(store, DiskBlobStore):
            metrics.cache_bytes.set(store.total_bytes)
            metrics.cache_blobs.set(len(store))
            metrics.cache_evicted.set(store.evicted)
        metrics.fills_active.set(len(self.pipeline.fills))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        """Open the upstream session and start the background tasks; stop them after."""
        session = new_upstream_session()
        tasks: list[asyncio.Task[None]] = []
        try:
            marks = None
            if self.role.shared and self.role.runtime_dir is not None:
                marks = self.role.runtime_dir / TRANSPORT_MARKS_DIR
            self._router = UpstreamRouter(
                config=self.config, session=session, metrics=self.metrics, transport_marks=marks
            )
            self._start_restore(self._router)
            if self.watcher is not None:
                tasks.append(asyncio.create_task(self.watcher.run(), name="policy-watcher"))
            scrub = self._scrub()
            if scrub is not None:
                tasks.append(asyncio.create_task(scrub, name="cache-scrub"))
            if self.metrics.multiprocess_dir is not None:
                tasks.append(asyncio.create_task(self._sample_forever(), name="gauges"))
            self.metrics.worker_starts.labels(self.metrics.worker).inc()
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await session.close()
            await self.pipeline.close()
            self._router = None
            if self.shared is not None:
                self.shared.close()

    def _start_restore(self, router: UpstreamRouter) -> None:
        """The restart restore: in worker 0, while the node's marker says it is due;
        the other workers wait for it as the restoring process itself would."""
        shared = self.shared
        if shared is None:
            self.pipeline.start_restore(router.route)
            return
        if not shared.restore_pending():
            return
        if self.role.primary:
            self.pipeline.start_restore(router.route)
            restoring = self.pipeline.restoring
            if restoring is None:
                shared.finish_restore()
            else:
                restoring.add_done_callback(lambda _: self._finish_restore())
        else:
            self.pipeline.await_restore(asyncio.create_task(self._restored_elsewhere()))

    def _finish_restore(self) -> None:
        if self.shared is None:
            return
        try:
            self.shared.finish_restore()
        except Exception:
            log.exception("could not tell the other workers that the restore is done")

    async def _restored_elsewhere(self) -> int:
        assert self.shared is not None
        # Another process's progress: nothing to await but the marker it clears.
        while True:
            if not self.shared.restore_pending():
                return 0
            await asyncio.sleep(RESTORE_POLL)

    def _scrub(self) -> Coroutine[Any, Any, None] | None:
        """The background scrub of the cache (worker 0 only: it is the node's cache)."""
        store, cache = self.store, self.config.cache
        if not (self.role.primary and isinstance(store, DiskBlobStore)):
            return None
        if cache.scrub_bytes_per_second <= 0:
            return None
        return scrub_forever(
            store,
            metrics=self.metrics,
            pool=self.pipeline.hash_pool,
            bytes_per_second=cache.scrub_bytes_per_second,
            interval=cache.scrub_interval_seconds,
        )

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.sample_gauges()
            except Exception:
                log.exception("sampling gauges failed")
            await asyncio.sleep(GAUGE_INTERVAL)


def _layer_checks_dir(config: Config, role: Role) -> Path | None:
    """Where tar layers' per-file plans live: with the cache, else where the workers
    meet, else (None) a private directory of this process."""
    if config.cache.dir is not None:
        return config.cache.dir / "filechecks"
    if role.shared and role.runtime_dir is not None:
        return role.runtime_dir / "filechecks"
    return None


def describe(config: Config, workers: int) -> str:
    """The start line: version, address, upstreams, workers."""
    upstreams = ", ".join(f"{u.name}={u.url}" for u in config.upstreams.values()) or "none"
    return (
        f"pullgate {__version__} listening on {config.listen_host}:{config.listen_port} "
        f"({workers} worker{'s' if workers != 1 else ''}); upstreams: {upstreams}; "
        f"default: {config.default_upstream}"
    )


async def serve_node(
    node: Node,
    *,
    cri: CriEndpoints | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``node`` until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    config, role = node.config, node.role
    async with node.running():
        app = build_app(
            config=config, pipeline=node.pipeline, router=node.router, metrics=node.metrics
        )
        runners: list[web.AppRunner] = []
        cri_server: tuple[grpc_aio.Server, grpc_aio.Channel] | None = None
        try:
            runner = web.AppRunner(
                app,
                access_log=None,
                shutdown_timeout=SHUTDOWN_GRACE,
                max_field_size=MAX_HEADER_FIELD,
                max_headers=MAX_HEADERS,
            )
            await runner.setup()
            runners.append(runner)
            if cri is not None and role.primary:
                from proxy.cri.server import start_cri_server

                router = node.router
                cri_server = await start_cri_server(
                    listen=cri.listen,
                    runtime_endpoint=cri.runtime,
                    pipeline=node.pipeline,
                    router=lambda: router,
                )
            site = web.TCPSite(
                runner,
                config.listen_host,
                config.listen_port,
                backlog=1024,
                reuse_port=role.shared or None,
            )
            await site.start()
            if config.admin_listen is not None:
                admin = web.AppRunner(build_admin_app(app), access_log=None, shutdown_timeout=5)
                await admin.setup()
                runners.append(admin)
                host, port = config.admin_listen
                await web.TCPSite(admin, host, port, reuse_port=role.shared or None).start()
                if role.primary:
                    log.info("admin endpoints (prefetch, metrics) on http://%s:%d", host, port)
            if on_ready is not None:
                on_ready()
            await stop.wait()
            log.info("stopping: finishing requests in flight (at most %.0fs)", SHUTDOWN_GRACE)
        finally:
            if cri_server is not None:
                await cri_server[0].stop(grace=2)
                await cri_server[1].close()
            for each in reversed(runners):
                await each.cleanup()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


def announce_serving(config: Config, detail: str = "") -> None:
    """The line that says the node serves: on stdout, or a log line in JSON mode (so
    that every line of output parses)."""
    text = f"pullgate: serving on http://{config.listen_host}:{config.listen_port}{detail}"
    if config.log_format == "json":
        log.info("%s", text)
    else:
        print(text, flush=True)


def serve(config: Config, *, cri: CriEndpoints | None = None) -> int:
    """``pullgate serve --workers 1``: one process, no supervisor. Exit code 0 after a
    graceful stop on SIGTERM/SIGINT, 2 if the policy does not load."""
    try:
        node = Node.build(config)
    except PolicyError as exc:
        log.error("policy error: %s", exc)
        print(f"pullgate: policy error: {exc}", file=sys.stderr)
        return 2
    log.info("%s", describe(config, 1))
    import uvloop

    def ready() -> None:
        announce_serving(config)

    try:
        uvloop.run(serve_node(node, cri=cri, on_ready=ready))
    except OSError as exc:  # the port is taken, the CRI socket's directory is missing, ...
        print(f"pullgate: cannot serve: {exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0
