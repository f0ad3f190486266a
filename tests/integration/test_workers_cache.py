"""One cache directory under ``serve --workers 2``: single-flight across the workers,
and the death of the worker that fills."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.faultproxy import FaultProxy, drip
from tests.support.ocilayout import deterministic_bytes, push_blob
from tests.support.peers import Pullgate, Registry
from tests.support.pulls import fetch

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
SIZE = 16 << 20


def fetch_all(pullgate: Pullgate, path: str, count: int) -> list[tuple[int, str, int]]:
    results: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def client() -> None:
        result = fetch(pullgate, path)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={REGISTRY}"


def responses_per_worker(pullgate: Pullgate) -> dict[str, float]:
    counts = {}
    for key, value in pullgate.metrics().items():
        match = re.fullmatch(r'pullgate_worker_responses_total\{worker="(\d+)"\}', key)
        if match:
            counts[match.group(1)] = value
    return counts


def fill_lock_holder(cache: Path, digest: str) -> int | None:
    """The pid holding the fill lock of ``digest`` (from /proc/locks, without taking it)."""
    try:
        inode = os.stat(cache / "ingest" / f"{digest.removeprefix('sha256:')}.lock").st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        held = "->" not in fields and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"]
        if held and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


def test_32_cold_pulls_over_two_workers_fetch_the_blob_upstream_once(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digest = push_blob(registry.url, "cache/fanin", deterministic_bytes(SIZE, seed=91))
    faults = FaultProxy(registry.url).start()
    try:
        faults.set_fault(digest, drip(8 << 20))  # a fill of about 2 s: the pulls overlap
        cache = tmp_path / "cache"
        pullgate = make_pullgate(upstreams={REGISTRY: faults.url}, cache_dir=cache, workers=2)
        before = responses_per_worker(pullgate)
        results = fetch_all(pullgate, blob_path("cache/fanin", digest), 32)
        assert len(results) == 32
        assert all(status == 200 and got == digest for status, got, _ in results), results
        assert registry.blob_gets(digest) == 1
        after = responses_per_worker(pullgate)
        assert all(after[w] > before.get(w, 0.0) for w in ("0", "1")), (before, after)
        assert (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()
        assert list((cache / "ingest").iterdir()) == []
    finally:
        faults.stop()


def test_killing_the_filling_worker_cuts_every_reader_and_the_next_pull_refills(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digest = push_blob(registry.url, "cache/crash", deterministic_bytes(SIZE, seed=92))
    faults = FaultProxy(registry.url).start()
    try:
        faults.set_fault(digest, drip(2 << 20))  # about 8 s for the whole blob
        cache = tmp_path / "cache"
        pullgate = make_pullgate(upstreams={REGISTRY: faults.url}, cache_dir=cache, workers=2)
        results: list[list[tuple[int, str, int]]] = []
        clients = threading.Thread(
            target=lambda: results.append(fetch_all(pullgate, blob_path("cache/crash", digest), 16))
        )
        clients.start()
        deadline = time.monotonic() + 30
        while (filler := fill_lock_holder(cache, digest)) is None:
            assert time.monotonic() < deadline, "no worker took the fill lock"
            time.sleep(0.01)
        assert filler in pullgate.worker_pids()
        time.sleep(1.0)  # the readers in both workers are streaming the growing file
        os.kill(filler, signal.SIGKILL)
        clients.join(120)
        [pulls] = results
        assert len(pulls) == 16
        assert all(got != digest for _, got, _ in pulls), "a reader got the whole blob"
        assert not (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()
        # Requests counted as they reach the upstream (the registry logs them at their end).
        assert faults.hits(digest) == 1, "the 16 pulls over both workers made one fill"

        faults.set_fault(digest, drip(1 << 30))  # fast now, still counted
        again = fetch_all(pullgate, blob_path("cache/crash", digest), 4)
        assert all(status == 200 and got == digest for status, got, _ in again), again
        assert faults.hits(digest) == 2, "one fresh fill, never the dead one's"
        assert (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).is_file()
        assert list((cache / "ingest").iterdir()) == []
    finally:
        faults.stop()
