"""The one place that orchestrates a pull; HTTP and CRI both call it.

Its rooms:

* ``access``: private repositories, readable only with credentials the upstream
  accepts, cached or not;
* ``gate``: the protocol a signature gate implements (what the pipeline asks of it);
* ``manifests``: resolve, fetch the exact bytes, verify, store, serve offline, restore;
* ``allowances``: which blobs may be served (the gate's, offline, across workers);
* ``blobs``: open a blob from the store, the shared fill or the upstream; heads;
* ``stream``: the one held-back hashing streamer, for uncached streams and fills;
* ``fills`` and ``follow``: one upstream fetch per blob into the cache, in this
  process or followed from another one;
* ``walk``: the index walk shared by prefetch and ``pullgate verify``;
* ``prefetch``: warming the cache through the same verification.

``Pipeline`` builds the rooms and is what the front ends hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from proxy.cache import BlobStore
from proxy.cache.directio import DIRECT_MIN_BYTES
from proxy.cache.filechecks import LayerChecks
from proxy.cache.verified import VerifiedManifestStore
from proxy.metrics import Metrics
from proxy.pipeline.access import PullGrants, RepositoryAccess
from proxy.pipeline.allowances import BlobAllowances
from proxy.pipeline.blobs import BlobFile, BlobPath, BlobStream
from proxy.pipeline.fills import FillTable
from proxy.pipeline.gate import Gate
from proxy.pipeline.manifests import ManifestPath, ServedManifest
from proxy.pipeline.shared import SharedAllowances
from proxy.pipeline.stream import DataPath
from proxy.upstream.router import Route

__all__ = ["BlobFile", "BlobStream", "Pipeline", "ServedManifest"]


class Pipeline:
    """The manifest path, the blob path and what they share, wired once."""

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
        private_marks: Path | None = None,
        grant_key: bytes | None = None,
        layer_checks_dir: Path | None = None,
    ) -> None:
        self.gate = gate
        # Verified blobs; and, apart, verified manifests with their verdicts and tags.
        self.store = store
        self.manifests = manifests
        self.metrics = metrics
        self.shared = shared
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
        self.access = RepositoryAccess(marks_dir=private_marks, metrics=metrics)
        # Sealed under a key every process of this node shares (``Role.grant_key``).
        self.grants = PullGrants(grant_key or os.urandom(32))
        self.allowances = BlobAllowances(gate=gate, metrics=metrics, shared=shared)
        # Tar layers' per-file plans (set by model signatures) and their passes, on disk
        # (with the cache, else where the workers meet) so every worker enforces them.
        self.layer_checks = LayerChecks(layer_checks_dir)
        self.manifest_path = ManifestPath(
            gate=gate,
            verified=manifests,
            metrics=metrics,
            io=self.hash_pool,
            allowances=self.allowances,
            tag_staleness=tag_staleness,
            verdict_ttl=verdict_ttl,
            layer_checks=self.layer_checks,
        )
        self.blob_path = BlobPath(
            store=store,
            fills=self.fills,
            datapath=self.datapath,
            metrics=metrics,
            io=self.hash_pool,
            allowances=self.allowances,
            checks=self.layer_checks,
        )
        # The front ends' calls, answered by the room that owns them.
        self.guard = self.access.guard
        self.get_manifest = self.manifest_path.get_manifest
        self.fetch_manifest = self.manifest_path.fetch_manifest
        self.fetch_small_blob = self.manifest_path.fetch_small_blob
        self.fetch_referrers = self.manifest_path.fetch_referrers
        self.referrers_index = self.manifest_path.referrers_index
        self.tags = self.manifest_path.tags
        self.require_blob_allowed = self.allowances.require
        self.check_blob_allowed = self.allowances.check
        self.open_blob = self.blob_path.open_blob
        self.head_blob = self.blob_path.head_blob
        self.start_fill = self.blob_path.start_fill
        self.send_cached = self.blob_path.send_cached

    @property
    def restoring(self) -> asyncio.Task[int] | None:
        """The restart restore in progress (or done), if one was started."""
        return self.allowances.restoring

    def await_restore(self, restoring: asyncio.Task[int]) -> None:
        """Treat ``restoring`` (a restore another worker process runs for the node) as
        this pipeline's own: blob requests that would be refused wait for it."""
        self.allowances.restoring = restoring

    def start_restore(self, route_for: Callable[[str], Route]) -> None:
        """See ``ManifestPath.start_restore``."""
        self.manifest_path.start_restore(route_for)

    async def close(self) -> None:
        restoring = self.allowances.restoring
        if restoring is not None:
            restoring.cancel()
            with contextlib.suppress(BaseException):
                await restoring
        await self.fills.close()
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.datapath.close()
        self.layer_checks.close()
