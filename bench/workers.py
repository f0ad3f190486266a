"""Aggregate throughput with N worker processes and N concurrent layers.

For N = 1, 2, 4, ... up to the core count, N different blobs are pulled at once with curl (which
does not hash, so the client takes as little of the machine as it can), from:

* ``nginx`` with ``worker_processes N``, sending the same files (the serving limit);
* ``pullgate --workers N`` with an empty cache (cold: N verifying fills at once);
* the same pullgate again (warm: N hits; big blobs were filled around the page cache,
  so these are read from the disk with ``O_DIRECT``);
* a pullgate that fills through the page cache (``--direct-min-bytes 0``), then its
  hits (warm, resident: the case nginx's hot files are, and what more workers scale).

Each figure is N x blob size / the time until the last of the N pulls finished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.ocilayout import push_blob, write_blob_file
from tests.support.peers import Nginx, Pullgate, Registry

REPO = "bench/workers"
REGISTRY = "registry.example.test"


def pull_all(urls: list[str], expected_size: int) -> float:
    """Pull every URL at once with curl; seconds until the last one finished."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    sizes = [int(process.communicate(timeout=3600)[0] or 0) for process in processes]
    elapsed = time.perf_counter() - started
    bad = [url for url, size in zip(urls, sizes, strict=True) if size != expected_size]
    if bad or any(process.returncode for process in processes):
        raise RuntimeError(f"incomplete pulls: {bad}")
    return elapsed


def scaling(
    work: Path,
    registry: Registry,
    size: int,
    reps: int,
    add: Callable[[str, str, float], None],
    *,
    max_workers: int | None = None,
) -> None:
    cores = max_workers or os.cpu_count() or 1
    # 1, 2, 4, ... up to the core count (2 at least, so a small machine shows a step).
    counts = [1]
    while counts[-1] * 2 <= max(cores, 2):
        counts.append(counts[-1] * 2)
    blobs = work / "worker-blobs"
    blobs.mkdir()
    digests: list[str] = []
    for index in range(counts[-1]):
        path = blobs / f"blob{index}.bin"
        digest = write_blob_file(path, size, seed=1000 + index)
        push_blob(registry.url, REPO, path, digest=digest)
        digests.append(digest)
    for workers in counts:
        mine = digests[:workers]
        for rep in range(reps):
            nginx = Nginx(work / f"nginx-w{workers}-{rep}", blobs, workers=workers).start()
            try:
                seconds = pull_all([f"{nginx.url}/blob{i}.bin" for i in range(workers)], size)
            finally:
                nginx.stop()
            add(f"workers {workers}: nginx", "GB/s", workers * size / seconds / 1e9)
            cache = work / f"cache-w{workers}-{rep}"
            peer = Pullgate(
                work / f"pullgate-w{workers}-{rep}",
                upstreams={REGISTRY: registry.url},
                cache_dir=cache,
                extra_args=["--workers", str(workers)],
            ).start()
            try:
                urls = [f"{peer.url}/v2/{REPO}/blobs/{d}?ns={REGISTRY}" for d in mine]
                cold = pull_all(urls, size)
                warm = pull_all(urls, size)
            finally:
                peer.stop()
                shutil.rmtree(cache, ignore_errors=True)
            add(f"workers {workers}: pullgate cold", "GB/s", workers * size / cold / 1e9)
            add(f"workers {workers}: pullgate warm", "GB/s", workers * size / warm / 1e9)
            # The same hits with the blobs in the page cache (filled through it), as
            # nginx's files are: what the workers scale, apart from the disk.
            peer = Pullgate(
                work / f"pullgate-w{workers}-{rep}-resident",
                upstreams={REGISTRY: registry.url},
                cache_dir=cache,
                extra_args=["--workers", str(workers), "--direct-min-bytes", "0"],
            ).start()
            try:
                urls = [f"{peer.url}/v2/{REPO}/blobs/{d}?ns={REGISTRY}" for d in mine]
                pull_all(urls, size)
                resident = pull_all(urls, size)
            finally:
                peer.stop()
                shutil.rmtree(cache, ignore_errors=True)
            add(
                f"workers {workers}: pullgate warm, resident",
                "GB/s",
                workers * size / resident / 1e9,
            )
            print(
                f"  workers {workers} rep {rep}: nginx {workers * size / seconds / 1e9:.2f}, "
                f"cold {workers * size / cold / 1e9:.2f}, warm {workers * size / warm / 1e9:.2f}"
                " GB/s",
                flush=True,
            )
    shutil.rmtree(blobs, ignore_errors=True)
