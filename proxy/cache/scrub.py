"""Background scrub: re-hash stored blobs, quarantine any that no longer match.

Disk corruption and tampering both show up here. The scrub is rate-limited so it
never competes with pulls for the disk, and a blob found bad is taken out of
service at once: it is never served as complete again, by any process.

With several processes on one cache, one scrubs at a time (``locks/scrub``); a pass
asked of another meanwhile is skipped. The scrubbing process rescans the store first,
so it checks the blobs every process committed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from proxy.cache.disk import DiskBlobStore
from proxy.metrics import Metrics
from proxy.oci.digest import Digest

log = logging.getLogger("pullgate.scrub")

SCRUB_READ = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ScrubReport:
    checked: int
    corrupt: int
    bytes: int
    seconds: float
    # True when another process was scrubbing this cache: nothing was checked here.
    skipped: bool = False


def hash_file(
    path: os.PathLike[str] | str,
    digest: Digest,
    bytes_per_second: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Whether the file hashes to ``digest``, reading at most ``bytes_per_second``
    (0: unlimited). Runs in a worker thread: it sleeps to stay under the rate."""
    hasher = digest.hasher()
    started = clock()
    done = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(SCRUB_READ):
            hasher.update(chunk)
            done += len(chunk)
            if bytes_per_second > 0:
                ahead = done / bytes_per_second - (clock() - started)
                if ahead > 0:
                    sleep(ahead)
    return hasher.hexdigest() == digest.hex


async def scrub_once(
    store: DiskBlobStore, *, metrics: Metrics, pool: Executor, bytes_per_second: int
) -> ScrubReport:
    """One pass over every stored blob; quarantines the ones that fail.

    Pinned blobs (being read or filled) are skipped this pass. Passes never overlap:
    the background loop and an admin trigger take turns, and while another process
    scrubs this cache the pass is skipped.
    """
    async with store.scrub_lock:
        with store.scrubbing() as held:
            if not held:
                log.info("scrub: another process is scrubbing %s; pass skipped", store.root)
                return ScrubReport(0, 0, 0, 0.0, skipped=True)
            loop = asyncio.get_running_loop()
            store.merge_scan(await loop.run_in_executor(pool, store.scan_blobs))
            return await _scrub_pass(
                store, metrics=metrics, pool=pool, bytes_per_second=bytes_per_second
            )


async def _scrub_pass(
    store: DiskBlobStore, *, metrics: Metrics, pool: Executor, bytes_per_second: int
) -> ScrubReport:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    checked = corrupt = total = 0
    for digest in list(store.digests()):
        path = store.path_of_quiet(digest)
        if path is None or store.is_pinned(digest):
            continue
        try:
            size = path.stat().st_size
            ok = await loop.run_in_executor(pool, hash_file, path, digest, bytes_per_second)
        except FileNotFoundError:
            continue  # evicted meanwhile
        checked += 1
        total += size
        metrics.scrubbed.inc()
        if not ok and store.quarantine(digest, "content no longer matches its digest (scrub)"):
            corrupt += 1
            metrics.scrub_corrupt.inc()
    report = ScrubReport(checked, corrupt, total, time.perf_counter() - started)
    log.info(
        "scrub: %d blobs checked, %d corrupt, %d bytes in %.1fs",
        report.checked,
        report.corrupt,
        report.bytes,
        report.seconds,
    )
    return report


async def scrub_forever(
    store: DiskBlobStore,
    *,
    metrics: Metrics,
    pool: Executor,
    bytes_per_second: int,
    interval: float,
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await scrub_once(store, metrics=metrics, pool=pool, bytes_per_second=bytes_per_second)
        except OSError as exc:
            log.error("scrub pass failed: %s", exc)
