"""Randomized fault trials between pullgate and a real registry (200+ per run).

Each trial pulls a fresh blob through a fault-injecting proxy that resets the
connection at a random offset, flips a byte, stalls past the idle timeout, answers
5xx or 429 with Retry-After, or drips slowly. After every trial:

* no client received a complete body that differs from the digest;
* pullgate still serves the next good request.

After all trials: every cache entry matches its digest, and no streams, fills or file
descriptors leaked. The seed is printed in pytest's header (PULLGATE_FUZZ_SEED).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import counts
from tests.support.faultproxy import FaultProxy, corrupt_byte, cut_at, drip, stall, status
from tests.support.fuzzseed import SEED
from tests.support.ocilayout import push_blob
from tests.support.peers import Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
TRIALS = 200


def fetch(pullgate: Pullgate, digest: str) -> tuple[int, int | None, int, str]:
    """(status, promised length, bytes received, sha256 of what was received)."""
    host, port = pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    hasher = hashlib.sha256()
    received = 0
    try:
        conn.request("GET", f"/v2/trials/blob/blobs/{digest}?ns={REGISTRY}")
        response = conn.getresponse()
        length = response.headers.get("Content-Length")
        try:
            while chunk := response.read(256 * 1024):
                hasher.update(chunk)
                received += len(chunk)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError):
            pass
        promised = int(length) if length is not None else None
        return response.status, promised, received, "sha256:" + hasher.hexdigest()
    finally:
        conn.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_randomized_fault_trials_keep_every_invariant(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    rng = random.Random(SEED)
    print(f"fault trials seed {SEED}")
    blobs = []
    for _ in range(TRIALS + 1):
        size = rng.randrange(64 * 1024, 768 * 1024)
        data = rng.randbytes(size)
        blobs.append((push_blob(registry.url, "trials/blob", data), size))
    control, _ = blobs.pop()
    faults = FaultProxy(registry.url).start()
    config = tmp_path / "config.yaml"
    config.write_text(
        "timeouts: {connect: 2, read: 1}\nretries: {attempts: 3, backoff: 0.05, maxBackoff: 0.2}\n"
    )
    try:
        cached = make_pullgate(
            upstreams={REGISTRY: faults.url}, cache_dir=tmp_path / "cache", config=config
        )
        streamed = make_pullgate(upstreams={REGISTRY: faults.url}, config=config)
        peers = (cached, streamed)
        assert all(fetch(p, control)[3] == control for p in peers)
        fds_before = {p.pid: open_fds(p.pid) for p in peers}
        outcomes: dict[str, int] = {}
        started = time.monotonic()
        for trial, (digest, size) in enumerate(blobs):
            kind = rng.choices(
                ["cut", "corrupt", "stall", "5xx", "5xx-persistent", "429", "drip"],
                weights=[30, 30, 5, 15, 5, 5, 10],
            )[0]
            offset = rng.randrange(1, size)
            fault = {
                "cut": cut_at(offset),
                "corrupt": corrupt_byte(offset),
                "stall": stall(1.6, offset=offset),
                "5xx": status(rng.choice([500, 502, 503]), times=1),
                "5xx-persistent": status(503, times=100),
                "429": status(429, retry_after=rng.choice([0, 1]), times=1),
                "drip": drip(4 << 20),
            }[kind]
            faults.set_fault(digest, fault)
            pullgate = peers[trial % 2]
            code, promised, received, got = fetch(pullgate, digest)
            faults.clear()
            # Invariant 1: a complete body is a correct body.
            if code == 200 and promised is not None and received == promised:
                assert got == digest, f"trial {trial} ({kind}): complete but wrong body"
            # Faults that corrupt or cut must never deliver a complete body.
            if kind in ("cut", "corrupt", "stall"):
                assert not (code == 200 and received == size and got == digest) or kind == "stall"
            outcome = f"{kind}:{code}:{'complete' if received == size else 'short'}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            # Invariant 2: the next good request is served.
            assert fetch(pullgate, control)[3] == control, f"trial {trial} ({kind}) broke serving"
        counts.add("fault trials", TRIALS)
        print(f"{TRIALS} trials in {time.monotonic() - started:.1f}s: {sorted(outcomes.items())}")
        # Invariant 3: nothing in the cache differs from its digest.
        for path in (tmp_path / "cache" / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        # Invariant 4: nothing leaked.
        time.sleep(0.5)
        for peer in peers:
            metrics = peer.metrics()
            assert metrics.get("pullgate_blob_streams_active", 0) == 0
            assert metrics.get("pullgate_cache_fills_active", 0) == 0
            assert open_fds(peer.pid) <= fds_before[peer.pid] + 8
        assert any(o.startswith("corrupt:200:short") for o in outcomes)
        assert any(o.startswith("5xx:200:complete") for o in outcomes)
    finally:
        faults.stop()


NODE_TRIALS = 30


def test_randomized_node_side_faults_keep_every_invariant(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    """SIGKILL mid-fill then restart, a cached file altered on disk then a scrub, and
    ENOSPC on a small tmpfs, chosen at random."""
    import subprocess
    import threading
    import urllib.request

    rng = random.Random(SEED + 1)
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    faults = FaultProxy(registry.url).start()
    try:
        disk = make_pullgate(upstreams={REGISTRY: faults.url}, cache_dir=tmp_path / "cache")
        full = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=mount / "cache")
        control = push_blob(registry.url, "trials/blob", rng.randbytes(100_000))
        kinds: dict[str, int] = {}
        for trial in range(NODE_TRIALS):
            kind = rng.choice(["sigkill", "tamper", "enospc"])
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "enospc":
                size = rng.randrange(5 << 20, 9 << 20)
                digest = push_blob(registry.url, "trials/blob", rng.randbytes(size))
                code, promised, received, got = fetch(full, digest)
                if code == 200 and promised is not None and received == promised:
                    assert got == digest, f"node trial {trial}: complete but wrong body"
                assert fetch(full, control)[3] == control
                continue
            size = rng.randrange(1 << 20, 3 << 20)
            digest = push_blob(registry.url, "trials/blob", rng.randbytes(size))
            if kind == "sigkill":
                faults.set_fault(digest, drip(2 << 20))
                results: list[tuple[int, int | None, int, str]] = []
                reader = threading.Thread(
                    target=lambda d=digest, out=results: out.append(fetch(disk, d))
                )
                reader.start()
                time.sleep(rng.uniform(0.1, 0.6))
                disk.kill()
                reader.join(30)
                faults.clear()
                if results and results[0][2] == size:
                    assert results[0][3] == digest
                disk.start()
            else:  # tamper: cache it, alter it on disk, scrub
                assert fetch(disk, digest)[3] == digest
                path = tmp_path / "cache" / "blobs" / "sha256" / digest.split(":", 1)[1]
                with open(path, "r+b") as file:
                    offset = rng.randrange(size)
                    file.seek(offset)
                    byte = file.read(1)
                    file.seek(offset)
                    file.write(bytes([byte[0] ^ 0x80]))
                scrub = urllib.request.Request(f"{disk.admin_url}/admin/scrub", method="POST")
                urllib.request.urlopen(scrub, timeout=60).close()
            code, _, _, got = fetch(disk, digest)
            assert code == 200 and got == digest, f"node trial {trial} ({kind}) broke serving"
        counts.add("node fault trials", NODE_TRIALS)
        print(f"node trials: {sorted(kinds.items())}")
        for cache in (tmp_path / "cache", mount / "cache"):
            directory = cache / "blobs" / "sha256"
            for path in directory.iterdir() if directory.is_dir() else ():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    finally:
        faults.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)
