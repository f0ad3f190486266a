"""The node cache with real peers: single-flight, crashes, scrub, eviction, outages, ENOSPC."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.faultproxy import FaultProxy, drip
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_blob, push_image
from tests.support.peers import Containerd, Pullgate, Registry
from tests.support.pulls import fetch

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={REGISTRY}"


def stored(cache: Path) -> set[str]:
    directory = cache / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in directory.iterdir()} if directory.is_dir() else set()


def test_32_concurrent_cold_pulls_fetch_the_blob_upstream_once(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    blob = deterministic_bytes(64 << 20, seed=81)
    digest = push_blob(registry.url, "cache/fanin", blob)
    del blob
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache")
    results: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def client() -> None:
        result = fetch(pullgate, blob_path("cache/fanin", digest))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 32
    assert all(status == 200 and got == digest for status, got, _ in results)
    assert registry.blob_gets(digest) == 1
    assert digest in stored(tmp_path / "cache")


def test_sigkill_during_fill_leaves_nothing_partial_and_refetches(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digest = push_blob(registry.url, "cache/crash", deterministic_bytes(16 << 20, seed=82))
    faults = FaultProxy(registry.url).start()
    try:
        faults.set_fault(digest, drip(4 << 20))  # about 4 s for the whole blob
        cache = tmp_path / "cache"
        pullgate = make_pullgate(upstreams={REGISTRY: faults.url}, cache_dir=cache)
        results: list[tuple[int, str, int]] = []
        reader = threading.Thread(
            target=lambda: results.append(fetch(pullgate, blob_path("cache/crash", digest)))
        )
        reader.start()
        deadline = time.monotonic() + 10
        while not any((cache / "ingest").glob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        pullgate.kill()  # SIGKILL mid-fill
        reader.join(30)
        assert results and (results[0][1] != digest), "a killed fill delivered the full blob"
        assert digest not in stored(cache)

        faults.clear()
        pullgate.start()
        assert not any((cache / "ingest").glob("*")), "recovery left ingest files behind"
        before = registry.blob_gets(digest)
        status, got, _ = fetch(pullgate, blob_path("cache/crash", digest))
        assert status == 200 and got == digest
        assert registry.blob_gets(digest) == before + 1  # fetched again, not from a partial
        assert digest in stored(cache)
    finally:
        faults.stop()


def test_scrub_quarantines_a_flipped_byte_and_never_serves_it(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digest = push_blob(registry.url, "cache/scrub", deterministic_bytes(2 << 20, seed=83))
    cache = tmp_path / "cache"
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=cache)
    assert fetch(pullgate, blob_path("cache/scrub", digest))[1] == digest
    path = cache / "blobs" / "sha256" / digest.split(":", 1)[1]
    with open(path, "r+b") as file:
        file.seek(12345)
        byte = file.read(1)
        file.seek(12345)
        file.write(bytes([byte[0] ^ 0x01]))
    request = urllib.request.Request(f"{pullgate.admin_url}/admin/scrub", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        report = json.loads(response.read())
    assert report
    assert pullgate.metrics().get("pullgate_cache_corrupt_blobs_total", 0) >= 1
    assert not path.exists()
    status, got, _ = fetch(pullgate, blob_path("cache/scrub", digest))
    assert status == 200 and got == digest  # refetched and verified, never the bad copy


def test_eviction_keeps_the_cache_under_its_limit(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digests = [
        push_blob(registry.url, "cache/evict", deterministic_bytes(3 << 20, seed=90 + n))
        for n in range(6)
    ]
    cache = tmp_path / "cache"
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        cache_dir=cache,
        extra_args=["--cache-max-bytes", "10M"],
    )
    for digest in digests:
        status, got, _ = fetch(pullgate, blob_path("cache/evict", digest))
        assert status == 200 and got == digest
        total = sum(p.stat().st_size for p in (cache / "blobs" / "sha256").iterdir())
        assert total <= 10 << 20
    assert pullgate.metrics().get("pullgate_cache_evicted_blobs", 0) >= 1
    assert digests[-1] in stored(cache)  # the most recent survives


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_fill_fails_cleanly_or_serves_uncached(
    tmpfs: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    digest = push_blob(registry.url, "cache/full", deterministic_bytes(16 << 20, seed=84))
    small = push_blob(registry.url, "cache/full", deterministic_bytes(1 << 20, seed=85))
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        cache_dir=tmpfs / "cache",
        extra_args=["--cache-max-bytes", "100M"],  # the disk, not the budget, runs out
    )
    status, got, _ = fetch(pullgate, blob_path("cache/full", digest))
    assert status in (200, 503, 507)
    if status == 200:
        # Either served whole and correct, or cut short: never a complete wrong body.
        assert got == digest or _ < 16 << 20
    assert digest not in stored(tmpfs / "cache")
    status, got, _ = fetch(pullgate, blob_path("cache/full", small))
    assert status == 200 and got == small  # the service keeps running
    assert fetch(pullgate, blob_path("cache/full", digest))[1] == digest


def test_cached_image_pulls_through_containerd_with_upstream_down(
    tmp_path: Path, make_pullgate: Callable[..., Pullgate]
) -> None:
    registry = Registry(tmp_path / "registry").start()
    try:
        pushed = push_image(
            registry.url, "cache/app", "v1", layers=[deterministic_bytes(200_000, 86)]
        )
        config = tmp_path / "config.yaml"
        config.write_text("cache:\n  tagStaleness: 600\n")
        pullgate = make_pullgate(
            upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache", config=config
        )
        first = Containerd(tmp_path / "ctd1").start()
        try:
            first.write_hosts(REGISTRY, pullgate.url)
            first.ctr("images", "pull", "--plain-http", "--hosts-dir", str(first.certs_dir),
                      f"{REGISTRY}/cache/app:v1")  # fmt: skip
        finally:
            first.stop()
    finally:
        registry.stop()  # the upstream is gone from here on
    second = Containerd(tmp_path / "ctd2").start()
    try:
        second.write_hosts(REGISTRY, pullgate.url)
        done = second.ctr(
            "images", "pull", "--plain-http", "--hosts-dir", str(second.certs_dir),
            f"{REGISTRY}/cache/app:v1",
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + pullgate.log_text()[-3000:]
        assert pushed.manifest_digest in second.content_digests()
    finally:
        second.stop()
    strict = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache")
    status, _, _ = fetch(strict, f"/v2/cache/app/manifests/v1?ns={REGISTRY}")
    assert status == 503  # tag staleness off: no stale tag without the upstream


def test_blob_being_read_survives_eviction(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    # Bigger than loopback socket buffers, so serving it is still in progress while the
    # client stalls.
    in_use = push_blob(registry.url, "cache/pin", deterministic_bytes(48 << 20, seed=95))
    others = [
        push_blob(registry.url, "cache/pin", deterministic_bytes(12 << 20, seed=96 + n))
        for n in range(4)
    ]
    cache = tmp_path / "cache"
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        cache_dir=cache,
        extra_args=["--cache-max-bytes", "64M"],
    )
    assert fetch(pullgate, blob_path("cache/pin", in_use))[1] == in_use
    host, port = pullgate.host.rsplit(":", 1)
    slow = http.client.HTTPConnection(host, int(port), timeout=60)
    slow.request("GET", blob_path("cache/pin", in_use))
    response = slow.getresponse()
    hasher = hashlib.sha256(response.read(64 * 1024))  # start reading, then stall
    for digest in others:  # push the cache well past its budget meanwhile
        assert fetch(pullgate, blob_path("cache/pin", digest))[1] == digest
    assert in_use in stored(cache), "a blob being read was evicted"
    while chunk := response.read(1 << 20):
        hasher.update(chunk)
    slow.close()
    assert "sha256:" + hasher.hexdigest() == in_use
    assert pullgate.metrics().get("pullgate_cache_evicted_blobs", 0) >= 1


def test_upstream_down_serves_only_verdicts_of_the_policy_in_force(
    tmp_path: Path, make_pullgate: Callable[..., Pullgate]
) -> None:
    from proxy.oci.digest import Digest
    from tests.support import cosign_sign as cs

    registry = Registry(tmp_path / "registry").start()
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    strict = (
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    policy.write_text(strict)
    try:
        pushed = push_image(registry.url, "cache/signed", "v1", layers=[b"offline layer" * 100])
        digest = Digest.parse(pushed.manifest_digest)
        payload = cs.simple_signing_payload(digest, f"{REGISTRY}/cache/signed")
        cs.push_to_registry(
            registry.url, "cache/signed", cs.signature_image(digest, [cs.sign_layer(key, payload)])
        )
        config = tmp_path / "config.yaml"
        config.write_text("cache:\n  tagStaleness: 600\n")
        pullgate = make_pullgate(
            upstreams={REGISTRY: registry.url},
            cache_dir=tmp_path / "cache",
            config=config,
            policy=policy,
        )
        by_digest = f"/v2/cache/signed/manifests/{pushed.manifest_digest}?ns={REGISTRY}"
        assert fetch(pullgate, f"/v2/cache/signed/manifests/v1?ns={REGISTRY}")[0] == 200
    finally:
        registry.stop()
    pullgate.restart()  # a fresh process: only the disk remembers the verdict
    assert fetch(pullgate, by_digest)[0] == 200
    reloads = pullgate.metrics().get("pullgate_policy_reloads_total", 0.0)
    policy.write_text(strict + "verdictCache: {positiveTTL: 301}\n")  # a new revision
    deadline = time.monotonic() + 20
    while pullgate.metrics().get("pullgate_policy_reloads_total", 0.0) <= reloads:
        assert time.monotonic() < deadline, "policy did not reload"
        time.sleep(0.2)
    status, _, _ = fetch(pullgate, by_digest)
    assert status == 503  # verified under another policy: not served without the upstream


def _signed_image_setup(
    tmp_path: Path, registry: Registry, *, ttl: str = ""
) -> tuple[Path, PushedArtifact, PushedArtifact]:
    """A strict cosign-key policy, a signed two-layer image and an unsigned one."""
    from proxy.oci.digest import Digest
    from tests.support import cosign_sign as cs

    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\n" + ttl + "scopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    signed = push_image(
        registry.url,
        "restart/signed",
        "v1",
        layers=[deterministic_bytes(300_000, 91), deterministic_bytes(300_000, 92)],
    )
    digest = Digest.parse(signed.manifest_digest)
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/restart/signed")
    cs.push_to_registry(
        registry.url, "restart/signed", cs.signature_image(digest, [cs.sign_layer(key, payload)])
    )
    unsigned = push_image(
        registry.url, "restart/unsigned", "v1", layers=[deterministic_bytes(300_000, 93)]
    )
    return policy, signed, unsigned


def test_a_pull_in_flight_across_a_restart_gets_its_remaining_blobs(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    policy, signed, _ = _signed_image_setup(tmp_path, registry)
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache", policy=policy
    )
    first, second = signed.layer_digests
    assert fetch(pullgate, f"/v2/restart/signed/manifests/v1?ns={REGISTRY}")[0] == 200
    assert fetch(pullgate, blob_path("restart/signed", first))[:2] == (200, first)
    pullgate.restart()  # a DaemonSet rollout in the middle of the pull
    # The client carries on with the next layer, without asking for the manifest again.
    assert fetch(pullgate, blob_path("restart/signed", second))[:2] == (200, second)
    assert fetch(pullgate, blob_path("restart/signed", first))[:2] == (200, first)


def test_refuses_blobs_after_a_restart_that_no_recent_verdict_allowed(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    policy, signed, unsigned = _signed_image_setup(
        tmp_path, registry, ttl="verdictCache: {positiveTTL: 1, negativeTTL: 1}\n"
    )
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache", policy=policy
    )
    assert fetch(pullgate, f"/v2/restart/signed/manifests/v1?ns={REGISTRY}")[0] == 200
    assert fetch(pullgate, f"/v2/restart/unsigned/manifests/v1?ns={REGISTRY}")[0] == 403
    time.sleep(1.5)  # the allowing verdict is now older than its positive TTL
    pullgate.restart()
    layer = signed.layer_digests[0]
    status, _, received = fetch(pullgate, blob_path("restart/signed", layer))
    assert status == 403 and received < 1000  # an OCI error body, no blob bytes
    unsigned_layer = unsigned.layer_digests[0]
    status, _, received = fetch(pullgate, blob_path("restart/unsigned", unsigned_layer))
    assert status == 403 and received < 1000


def test_a_big_blob_is_filled_and_served_around_the_page_cache_with_exact_bytes(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    from proxy.cache.directio import ALIGN, DIRECT_MIN_BYTES, open_ingest

    blob = deterministic_bytes(DIRECT_MIN_BYTES + (16 << 20) + 4321, seed=91)
    digest = push_blob(registry.url, "cache/big", blob)
    cache = tmp_path / "cache"
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=cache)
    status, got, received = fetch(pullgate, blob_path("cache/big", digest))
    assert (status, got, received) == (200, digest, len(blob))
    fd, direct = open_ingest(str(tmp_path / "probe"), direct=True)
    os.close(fd)
    # pullgate's own account: all but the unaligned tail went around the page cache
    # (where the filesystem takes O_DIRECT), and the client that started the fill got
    # every byte from memory, none read back from the file.
    tail = len(blob) % ALIGN
    metrics = pullgate.metrics()
    expected_direct = len(blob) - tail if direct else 0
    assert metrics['pullgate_cache_fill_bytes_total{io="direct"}'] == expected_direct
    buffered = metrics['pullgate_cache_fill_bytes_total{io="page_cache"}']
    assert buffered == len(blob) - expected_direct
    assert metrics['pullgate_bytes_served_total{source="fill_memory"}'] == len(blob)
    assert metrics.get('pullgate_bytes_served_total{source="fill"}', 0.0) == 0.0
    # Hits (read with O_DIRECT where its pages are not resident): whole and ranged.
    assert fetch(pullgate, blob_path("cache/big", digest))[:2] == (200, digest)
    host, port = pullgate.host.rsplit(":", 1)
    for first, last in ((0, 0), (4097, 4097 + (9 << 20)), (len(blob) - 10, len(blob) - 1)):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(
                "GET", blob_path("cache/big", digest), headers={"Range": f"bytes={first}-{last}"}
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 206
        assert response.getheader("Content-Range") == f"bytes {first}-{last}/{len(blob)}"
        assert body == blob[first : last + 1]
    assert registry.blob_gets(digest) == 1
