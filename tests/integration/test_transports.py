"""Chaining through a cluster cache with real peers: Debian's ``docker-registry`` as the
origin, a second one in proxy mode in front of it as the "regional cache", pullgate
subprocesses with that cache as their first transport, containerd as the client.

The cache is untrusted: blobs may come through it, but manifests, signatures and
referrers come from the origin, every byte is checked against its digest, and a cache
that misbehaves is bypassed.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support import counts
from tests.support.faultproxy import FaultProxy, corrupt_byte, stall
from tests.support.mirrorconfig import REGISTRY, label, push, write_config
from tests.support.ocilayout import PushedArtifact
from tests.support.peers import Containerd, Pullgate, Registry
from tests.support.pulls import fetch
from tests.support.silent import SilentServer

pytestmark = pytest.mark.integration


def settled(count: Callable[[], int]) -> int:
    """``count()`` once it stopped changing: the proxy registry stores what it fetched
    in the background, and access log lines land when a request completes."""
    last = count()
    stable_since = time.monotonic()
    deadline = stable_since + 20
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            break
    return last


def ctr_pull(containerd: Containerd, repository: str, tag: str) -> tuple[int, str]:
    done = containerd.ctr(
        "images",
        "pull",
        "--plain-http",
        "--hosts-dir",
        str(containerd.certs_dir),
        f"{REGISTRY}/{repository}:{tag}",
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def http_pull(pullgate: Pullgate, pushed: PushedArtifact, digest: str) -> tuple[int, str, int]:
    """The manifest by tag (which allows its blobs), then one blob: (status, sha256 of
    what arrived, bytes received)."""
    status, _, _ = fetch(pullgate, f"/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}")
    assert status == 200
    return fetch(pullgate, f"/v2/{pushed.repository}/blobs/{digest}?ns={REGISTRY}")


@pytest.fixture
def origin(registry: Registry) -> Registry:
    """The origin: the suite's docker-registry (tests/conftest.py)."""
    return registry


@pytest.fixture
def regional(tmp_path: Path, origin: Registry) -> Iterator[Registry]:
    peer = Registry(tmp_path / "regional", proxy_remote=origin.url).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def faults(regional: Registry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(regional.url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def pull_on_two_cold_nodes(
    tmp_path: Path,
    origin: Registry,
    transport_url: str,
    pushed: PushedArtifact,
    make_pullgate: Callable[..., Pullgate],
) -> tuple[dict[str, int], dict[str, int], list[Pullgate]]:
    """Two nodes (a pullgate with its own cache, a containerd) pull ``pushed`` one after
    the other through ``transport_url``; the origin's blob GETs after each."""
    transports = [{"name": "regional", "url": transport_url}]
    nodes = []
    for index in range(2):
        config = write_config(
            tmp_path / f"node{index}" / "config.yaml",
            origin.url,
            transports,
            cache=tmp_path / f"node{index}" / "cache",
        )
        pullgate = make_pullgate(upstreams={}, config=config)
        containerd = Containerd(tmp_path / f"node{index}" / "containerd").start()
        containerd.write_hosts(REGISTRY, pullgate.url)
        nodes.append((pullgate, containerd))

    def origin_gets() -> dict[str, int]:
        return {blob: settled(partial(origin.blob_gets, blob)) for blob in pushed.blobs}

    try:
        code, output = ctr_pull(nodes[0][1], pushed.repository, pushed.tag)
        assert code == 0, output
        after_one = origin_gets()
        code, output = ctr_pull(nodes[1][1], pushed.repository, pushed.tag)
        assert code == 0, output
        after_two = origin_gets()
        for _, containerd in nodes:
            assert set(pushed.blobs) <= containerd.content_digests()
    finally:
        for _, containerd in nodes:
            containerd.stop()
    pullgates = [pullgate for pullgate, _ in nodes]
    for pullgate in pullgates:
        metrics = pullgate.metrics()
        through = label("pullgate_transport_bytes_total", registry=REGISTRY, transport="regional")
        assert metrics[through] == sum(pushed.blobs.values())
        direct = label("pullgate_transport_bytes_total", registry=REGISTRY, transport="origin")
        assert metrics.get(direct, 0) == 0
    return after_one, after_two, pullgates


def test_two_cold_nodes_through_a_registry_proxy_cost_the_origin_what_one_costs(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "chain/cold")
    after_one, after_two, _ = pull_on_two_cold_nodes(
        tmp_path, origin, regional.url, pushed, make_pullgate
    )
    # The second node's cold pull costs the origin no blob fetch at all: every blob
    # was fetched only on the regional cache's own miss. (distribution 2.8 in proxy
    # mode fetches a missed blob twice: once streamed to its client, once by its
    # background store; that is the cache's cost, not pullgate's.)
    assert after_two == after_one
    assert all(1 <= gets <= 2 for gets in after_one.values()), after_one
    counts.add("transports: origin GETs per blob, two nodes via registry proxy",
               max(after_two.values()))  # fmt: skip
    # Each node asked the regional cache once per blob, naming the origin (ns=).
    for blob in pushed.blobs:
        asked = [
            e for e in regional.access_log() if e.method == "GET" and f"/blobs/{blob}" in e.path
        ]
        assert len(asked) == 2
        assert all(f"ns={REGISTRY}" in e.path for e in asked)


def test_two_cold_nodes_through_a_regional_pullgate_cost_the_origin_one_fetch(
    tmp_path: Path,
    origin: Registry,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "chain/coldpg")
    regional = make_pullgate(
        upstreams={REGISTRY: origin.url}, default_upstream=REGISTRY, cache_dir=tmp_path / "rc"
    )
    after_one, after_two, _ = pull_on_two_cold_nodes(
        tmp_path, origin, regional.url, pushed, make_pullgate
    )
    assert after_one == after_two == dict.fromkeys(pushed.blobs, 1)


def test_stopped_regional_cache_falls_back_to_origin(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    first = push(origin, "chain/before")
    second = push(origin, "chain/after")
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": regional.url}],
        cache=tmp_path / "cache",
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    status, got, _ = http_pull(pullgate, first, first.layer_digests[0])
    assert (status, got) == (200, first.layer_digests[0])
    regional.stop()
    status, got, _ = http_pull(pullgate, second, second.layer_digests[0])
    assert (status, got) == (200, second.layer_digests[0])
    assert settled(lambda: origin.blob_gets(second.layer_digests[0])) == 1
    metrics = pullgate.metrics()
    refused = label(
        "pullgate_transport_failovers_total",
        registry=REGISTRY,
        transport="regional",
        reason="refused",
    )
    assert metrics[refused] == 1
    assert (
        metrics[label("pullgate_transport_bypassed", registry=REGISTRY, transport="regional")] == 1
    )
    assert (
        metrics[label("pullgate_transport_bytes_total", registry=REGISTRY, transport="origin")]
        >= second.blobs[second.layer_digests[0]]
    )


@pytest.mark.parametrize(
    ("cached", "workers"),
    [(True, 1), (False, 1), (False, 2)],
    ids=["cached", "uncached", "2-workers"],
)
def test_refuses_corrupted_bytes_from_the_regional_cache_and_bypasses_it(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
    cached: bool,
    workers: int,
) -> None:
    pushed = push(origin, "chain/corrupt", size=4 << 20)
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    faults.set_fault(f"/blobs/{layer}", corrupt_byte(size // 2))
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": faults.url, "badFor": 600}],
        cache=tmp_path / "cache" if cached else None,
    )
    pullgate = make_pullgate(upstreams={}, config=config, workers=workers)
    status, got, received = http_pull(pullgate, pushed, layer)
    # Whatever the client received, it was never the complete (wrong) body.
    assert received < size
    assert got != layer
    metrics = pullgate.metrics()
    marked = label(
        "pullgate_transport_marked_bad_total",
        registry=REGISTRY,
        transport="regional",
        reason="digest",
    )
    assert metrics[marked] == 1
    assert metrics[label("pullgate_blob_digest_mismatch_total", registry=REGISTRY)] == 1
    # The next pulls succeed through the origin; the bad transport is not asked again,
    # by any worker (with several, the mark is shared).
    for _ in range(2 * workers):
        status, got, received = http_pull(pullgate, pushed, layer)
        assert (status, got, received) == (200, layer, size)
    assert faults.hits(f"/blobs/{layer}") == 1
    assert settled(lambda: origin.blob_gets(layer)) >= 1
    metrics = pullgate.metrics()
    skipped = label(
        "pullgate_transport_failovers_total",
        registry=REGISTRY,
        transport="regional",
        reason="skipped",
    )
    # Uncached, every later pull went upstream and skipped the bad transport; cached,
    # only the first did (the others were served from the cache).
    assert metrics[skipped] == (1 if cached else 2 * workers)


def test_containerd_never_commits_corrupted_bytes_from_the_regional_cache(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    faults: FaultProxy,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "chain/corruptctr", size=4 << 20)
    layer = pushed.layer_digests[0]
    faults.set_fault(f"/blobs/{layer}", corrupt_byte(pushed.blobs[layer] // 3))
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": faults.url, "badFor": 600}],
        cache=tmp_path / "cache",
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    containerd.write_hosts(REGISTRY, pullgate.url)
    first_code, first_output = ctr_pull(containerd, pushed.repository, pushed.tag)
    # containerd resumes a cut body with a Range request, which pullgate answers from the
    # origin (the transport is bypassed by then): the stitched blob fails containerd's own
    # digest check, so the first pull fails (or, had the cut come before the corrupt
    # byte, succeeds) and wrong content is never committed.
    if first_code != 0:
        assert "unexpected commit digest" in first_output, first_output
        assert layer not in containerd.content_digests()
    else:
        assert set(pushed.blobs) <= containerd.content_digests()
    # containerd drops the failed ingest once the pull's lease is gone and its GC ran
    # (kubelet's retry backoff leaves it that time); then the next pull starts afresh.
    deadline = time.monotonic() + 30
    while layer in containerd.ctr("content", "active", check=False).stdout:
        assert time.monotonic() < deadline, "containerd kept the failed ingest"
        time.sleep(0.2)
    code, output = ctr_pull(containerd, pushed.repository, pushed.tag)
    assert code == 0, f"{first_output}\n{output}"
    assert set(pushed.blobs) <= containerd.content_digests()
    # ... the corrupting transport was asked once, then bypassed.
    assert faults.hits(f"/blobs/{layer}") == 1
    metrics = pullgate.metrics()
    marked = label(
        "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="regional",
        reason="digest",
    )  # fmt: skip
    assert metrics[marked] == 1
    counts.add("transports: containerd's first pull through a corrupting cache succeeded",
               int(first_code == 0))  # fmt: skip


def test_stalling_transport_costs_one_pull_its_first_byte_timeout(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    silent = SilentServer()
    try:
        images = [push(origin, f"chain/stall{index}") for index in range(3)]
        config = write_config(
            tmp_path / "config.yaml",
            origin.url,
            [
                {
                    "name": "stalled",
                    "url": silent.url,
                    "timeouts": {"firstByte": 1},
                    "downFor": 600,
                },
                {"name": "regional", "url": regional.url},
            ],
            cache=tmp_path / "cache",
        )
        pullgate = make_pullgate(upstreams={}, config=config)
        for index, pushed in enumerate(images):
            layer = pushed.layer_digests[0]
            started = time.monotonic()
            status, got, _ = http_pull(pullgate, pushed, layer)
            assert (status, got) == (200, layer)
            # Reported, not asserted (tests never assert wall-clock times).
            elapsed_ms = int((time.monotonic() - started) * 1000)
            counts.add(f"transports: stalled first transport (firstByte 1 s), pull {index + 1} ms",
                       elapsed_ms)  # fmt: skip
        # Only the first blob request waited for the stalled transport.
        assert silent.accepted == 1
    finally:
        silent.close()
    metrics = pullgate.metrics()
    timed_out = label(
        "pullgate_transport_marked_bad_total",
        registry=REGISTRY,
        transport="stalled",
        reason="first_byte",
    )
    assert metrics[timed_out] == 1
    served = label("pullgate_transport_bytes_total", registry=REGISTRY, transport="regional")
    assert metrics[served] >= sum(p.blobs[p.layer_digests[0]] for p in images)


def test_transport_stalling_mid_body_is_cut_after_its_read_timeout_and_bypassed(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "chain/midstall", size=4 << 20)
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    # Headers and half the body, then nothing for five times the read timeout (short
    # enough for the fault proxy to stop cleanly afterwards).
    faults.set_fault(f"/blobs/{layer}", stall(5, offset=size // 2))
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": faults.url, "timeouts": {"read": 1}}],
        cache=tmp_path / "cache",
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    status, got, received = http_pull(pullgate, pushed, layer)
    assert received < size
    assert got != layer
    status, got, received = http_pull(pullgate, pushed, layer)
    assert (status, got, received) == (200, layer, size)
    assert faults.hits(f"/blobs/{layer}") == 1
    metrics = pullgate.metrics()
    broken = label(
        "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="regional",
        reason="broken",
    )  # fmt: skip
    assert metrics[broken] == 1


# ---- signatures from the origin ----------------------------------------------------


def write_policy(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "default: deny\n"
        "scopes:\n"
        f'  - match: "{REGISTRY}/**"\n'
        "    mode: enforce\n"
        "    require:\n"
        "      allOf:\n"
        "        - cosign: {key: keys/release.pub}\n"
    )
    return path


@dataclass
class SignedNode:
    origin: Registry
    pullgate: Pullgate
    containerd: Containerd
    key: cs.TestKey

    def sign(self, repository: str, digest: str) -> None:
        payload = cs.simple_signing_payload(Digest.parse(digest), f"{REGISTRY}/{repository}")
        artifact = cs.signature_image(Digest.parse(digest), [cs.sign_layer(self.key, payload)])
        cs.push_to_registry(self.origin.url, repository, artifact)


@pytest.fixture
def signed_node(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> SignedNode:
    key = cs.generate_key()
    policy = write_policy(tmp_path / "policy" / "policy.yaml")
    key.write_public(policy.parent / "keys" / "release.pub")
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": regional.url}],
        cache=tmp_path / "cache",
        policy=policy,
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    containerd.write_hosts(REGISTRY, pullgate.url)
    return SignedNode(origin, pullgate, containerd, key)


def test_signed_image_through_regional_cache_verifies_against_origin_signatures(
    signed_node: SignedNode, regional: Registry
) -> None:
    node = signed_node
    pushed = push(node.origin, "signed/app")
    node.sign("signed/app", pushed.manifest_digest)
    code, output = ctr_pull(node.containerd, pushed.repository, pushed.tag)
    assert code == 0, output
    stored = node.containerd.content_digests()
    assert pushed.manifest_digest in stored
    assert set(pushed.blobs) <= stored
    # The blobs came through the regional cache ...
    metrics = node.pullgate.metrics()
    served = label("pullgate_transport_bytes_total", registry=REGISTRY, transport="regional")
    assert metrics[served] >= sum(pushed.blobs.values())
    for blob in pushed.blobs:
        assert settled(lambda b=blob: regional.blob_gets(b)) >= 1
    # ... while manifests and signatures were read from the origin only.
    assert not [e for e in regional.access_log() if "/manifests/" in e.path]
    fallback_tag = "sha256-" + pushed.manifest_digest.split(":", 1)[1] + ".sig"
    assert any(fallback_tag in e.path for e in node.origin.access_log())


def test_refuses_unsigned_image_even_when_its_blobs_are_in_the_regional_cache(
    signed_node: SignedNode, regional: Registry
) -> None:
    node = signed_node
    pushed = push(node.origin, "signed/unsigned")
    code, output = ctr_pull(node.containerd, pushed.repository, pushed.tag)
    assert code != 0, output
    assert pushed.manifest_digest not in node.containerd.content_digests()
    for blob in pushed.blobs:
        assert regional.blob_gets(blob) == 0


def test_transport_serving_another_manifest_for_the_tag_changes_nothing(
    tmp_path: Path,
    origin: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    key = cs.generate_key()
    policy = write_policy(tmp_path / "policy" / "policy.yaml")
    key.write_public(policy.parent / "keys" / "release.pub")
    # The "transport" is a registry of its own holding a different image under the
    # same name and tag (and, for good measure, a valid signature for it by our key).
    rogue = Registry(tmp_path / "rogue").start()
    try:
        genuine = push(origin, "signed/tagged")
        impostor = push(rogue, "signed/tagged")
        assert impostor.manifest_digest != genuine.manifest_digest
        for registry, pushed in ((origin, genuine), (rogue, impostor)):
            payload = cs.simple_signing_payload(
                Digest.parse(pushed.manifest_digest), f"{REGISTRY}/signed/tagged"
            )
            artifact = cs.signature_image(
                Digest.parse(pushed.manifest_digest), [cs.sign_layer(key, payload)]
            )
            cs.push_to_registry(registry.url, "signed/tagged", artifact)
        config = write_config(
            tmp_path / "config.yaml",
            origin.url,
            [{"name": "rogue", "url": rogue.url}],
            cache=tmp_path / "cache",
            policy=policy,
        )
        pullgate = make_pullgate(upstreams={}, config=config)
        containerd.write_hosts(REGISTRY, pullgate.url)
        code, output = ctr_pull(containerd, "signed/tagged", "v1")
        assert code == 0, output
        stored = containerd.content_digests()
        assert genuine.manifest_digest in stored
        assert impostor.manifest_digest not in stored
        assert not set(impostor.blobs) & stored
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{pullgate.url}/v2/signed/tagged/manifests/v1?ns={REGISTRY}",
                headers={"Accept": genuine.media_type},
            ),
            timeout=30,
        ) as response:
            assert response.read() == genuine.manifest_bytes
        # Pushes aside, nobody asked the rogue transport for a manifest.
        asked = [e for e in rogue.access_log() if e.method in ("GET", "HEAD")]
        assert not [e for e in asked if "/manifests/" in e.path]
    finally:
        rogue.stop()


# ---- status ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_doctor_shows_transport_health_and_bytes(
    tmp_path: Path,
    origin: Registry,
    regional: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
    workers: int,
) -> None:

    pushed = push(origin, "chain/doctor", size=2 << 20)
    layer = pushed.layer_digests[0]
    faults.set_fault(f"/blobs/{layer}", corrupt_byte(1000))
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        [{"name": "regional", "url": faults.url}],
        cache=tmp_path / "cache",
    )
    pullgate = make_pullgate(upstreams={}, config=config, workers=workers)
    http_pull(pullgate, pushed, layer)
    status, got, _ = http_pull(pullgate, pushed, layer)
    assert (status, got) == (200, layer)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "--admin", pullgate.admin_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stdout.splitlines()
    regional_line = next(
        line for line in lines if line.startswith(f"transport {REGISTRY} regional:")
    )
    assert "bypassed" in regional_line
    assert "marked digest=1" in regional_line
    assert "failovers skipped=1" in regional_line
    origin_line = next(x for x in lines if x.startswith(f"transport {REGISTRY} origin:"))
    origin_bytes = int(origin_line.split()[3])
    assert origin_bytes >= pushed.blobs[layer]
    assert any("is bypassed" in line for line in lines)
    assert done.returncode == 1, done.stdout + done.stderr  # a bypassed transport is a finding
