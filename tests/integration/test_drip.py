"""Bounded upstream bodies with real peers: Debian's ``docker-registry`` as the origin,
the fault proxy (``tests.support.faultproxy``) in front of it for what a real registry
does not do (a body trickled just inside the read timeout, a lying Content-Length),
pullgate as a subprocess, and containerd (``ctr content fetch``) as the client.

- A transport that trickles its body is cut once it falls under its ``minRate`` for a
  ``minRateWindow`` of waiting, marked bad (``slow``), and the pull completes from the
  origin; an origin that trickles has its stream cut, counted.
- A Content-Length other than the size the verified manifest gives the blob is refused
  before a byte goes out (OCI error JSON naming both sizes); a transport announcing one
  is skipped.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import counts
from tests.support.faultproxy import FaultProxy, lie_length, trickle
from tests.support.mirrorconfig import REGISTRY, label, push
from tests.support.mirrorconfig import write_config as mirror_config
from tests.support.ocilayout import PushedArtifact
from tests.support.peers import Containerd, Pullgate, Registry
from tests.support.pulls import fetch

pytestmark = pytest.mark.integration

# Fast for the first MiB, then 16 bytes every 0.2 s: each piece far inside the read
# timeout (30 s), the whole about 80 bytes/s.
TRICKLE = {"piece": 16, "every": 0.2}
# The floor in these tests: 64 KiB/s judged over 1 s of waiting (the default is
# 16 KiB/s over 30 s; a short window keeps the tests short).
FLOOR = {"minRate": "64K", "minRateWindow": 1}


def write_config(path: Path, origin: str, **options: Any) -> Path:
    return mirror_config(path, origin, timeouts={"connect": 5, "read": 30, **FLOOR}, **options)


def ctr_fetch(containerd: Containerd, pushed: PushedArtifact) -> tuple[int, str]:
    done = containerd.ctr(
        "content", "fetch", "--plain-http", "--hosts-dir", str(containerd.certs_dir),
        f"{REGISTRY}/{pushed.repository}:{pushed.tag}",
        check=False,
        timeout=120,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def get_json(pullgate: Pullgate, path: str) -> tuple[int, dict[str, Any], int]:
    """GET ``path``: (status, the JSON body, bytes of it)."""
    host, port = pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body), len(body)
    finally:
        conn.close()


@pytest.fixture
def origin(registry: Registry) -> Registry:
    """The origin: the suite's docker-registry (tests/conftest.py)."""
    return registry


@pytest.fixture
def faults(origin: Registry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(origin.url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_refuses_transport_dripping_its_body(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
    cached: bool,
) -> None:
    pushed = push(origin, f"drip/transport{int(cached)}", size=4 << 20)
    layer = pushed.layer_digests[0]
    faults.set_fault(f"/blobs/{layer}", trickle(1 << 20, **TRICKLE))
    dripper = {"name": "dripper", "url": faults.url, "badFor": 600, **FLOOR}
    config = write_config(
        tmp_path / "config.yaml",
        origin.url,
        transports=[dripper],
        cache=tmp_path / "cache" if cached else None,
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    containerd.write_hosts(REGISTRY, pullgate.url)
    started = time.monotonic()
    code, output = ctr_fetch(containerd, pushed)
    if code != 0:
        # containerd may give up on the cut body instead of resuming it with a Range
        # (which pullgate answers from the origin by then): the next pull completes.
        code, output = ctr_fetch(containerd, pushed)
    elapsed_ms = int((time.monotonic() - started) * 1000)
    assert code == 0, output
    assert set(pushed.blobs) <= containerd.content_digests()
    # The trickling transport was asked once, cut, marked bad; the origin served the rest.
    assert faults.hits(f"/blobs/{layer}") == 1
    metrics = pullgate.metrics()
    slow = label(
        "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="dripper",
        reason="slow",
    )  # fmt: skip
    assert metrics[slow] == 1
    refused = label(
        "pullgate_upstream_bodies_refused_total", registry=REGISTRY, source="dripper",
        reason="slow",
    )  # fmt: skip
    assert metrics[refused] == 1
    if cached:  # what the cache keeps came from the origin, whole and verified
        assert any((tmp_path / "cache").rglob(layer.split(":", 1)[1]))
    # Reported, not asserted (tests never assert wall-clock times).
    mode = "cached" if cached else "uncached"
    counts.add(f"drip: ctr fetch past a trickling transport ({mode}) ms", elapsed_ms)


def test_refuses_origin_dripping_its_body(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "drip/origin", size=4 << 20)
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    faults.set_fault(f"/blobs/{layer}", trickle(1 << 20, **TRICKLE))
    config = write_config(tmp_path / "config.yaml", faults.url, cache=tmp_path / "cache")
    pullgate = make_pullgate(upstreams={}, config=config)
    status, _, _ = fetch(pullgate, f"/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}")
    assert status == 200
    status, got, received = fetch(pullgate, f"/v2/{pushed.repository}/blobs/{layer}?ns={REGISTRY}")
    # Cut mid-body: never a complete body, nothing cached.
    assert received < size
    assert got != layer
    deadline = time.monotonic() + 10  # the failed fill's staging file goes right after
    while any((tmp_path / "cache").rglob(layer.split(":", 1)[1])):
        assert time.monotonic() < deadline, "a trickled blob was kept"
        time.sleep(0.1)
    metrics = pullgate.metrics()
    refused = label(
        "pullgate_upstream_bodies_refused_total", registry=REGISTRY, source="origin",
        reason="slow",
    )  # fmt: skip
    assert metrics[refused] == 1
    assert "below the minimum rate" in pullgate.log_text()


def test_refuses_blob_whose_content_length_differs_from_the_manifest(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "drip/liar", size=2 << 20)
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    faults.set_fault(f"/blobs/{layer}", lie_length(4096))
    config = write_config(tmp_path / "config.yaml", faults.url, cache=tmp_path / "cache")
    pullgate = make_pullgate(upstreams={}, config=config)
    containerd.write_hosts(REGISTRY, pullgate.url)
    code, output = ctr_fetch(containerd, pushed)
    assert code != 0, output
    assert layer not in containerd.content_digests()
    # The refusal, as any client gets it: an OCI error naming both sizes, no body bytes.
    status, body, _ = get_json(pullgate, f"/v2/{pushed.repository}/blobs/{layer}?ns={REGISTRY}")
    assert status == 502
    error = body["errors"][0]
    assert error["code"] == "UPSTREAM_ERROR"
    assert f"Content-Length of {size + 4096} bytes" in error["message"]
    assert f"descriptor says {size} bytes" in error["message"]
    metrics = pullgate.metrics()
    refused = label(
        "pullgate_upstream_bodies_refused_total", registry=REGISTRY, source="origin",
        reason="length",
    )  # fmt: skip
    assert metrics[refused] >= 2


def test_refuses_transport_whose_content_length_differs_from_the_manifest(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    pushed = push(origin, "drip/liartransport", size=2 << 20)
    layer = pushed.layer_digests[0]
    faults.set_fault(f"/blobs/{layer}", lie_length(-(1 << 20)))
    liar = {"name": "liar", "url": faults.url, "badFor": 600}
    config = write_config(tmp_path / "config.yaml", origin.url, transports=[liar])
    pullgate = make_pullgate(upstreams={}, config=config)
    containerd.write_hosts(REGISTRY, pullgate.url)
    code, output = ctr_fetch(containerd, pushed)
    # Skipped before a byte was read: this very pull completes from the origin.
    assert code == 0, output
    assert set(pushed.blobs) <= containerd.content_digests()
    assert faults.hits(f"/blobs/{layer}") == 1
    metrics = pullgate.metrics()
    marked = label(
        "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="liar",
        reason="length",
    )  # fmt: skip
    assert metrics[marked] == 1


def test_refuses_lying_length_in_a_worker_that_did_not_serve_the_manifest(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    # Two workers under a policy: the size a served manifest gives a blob is shared
    # (the node's allowance store), so whichever worker a blob request lands on bounds
    # the body by it.
    pushed = push(origin, "drip/workers", size=2 << 20)
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    faults.set_fault(f"/blobs/{layer}", lie_length(-4096))
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'default: deny\nscopes:\n  - match: "{REGISTRY}/drip/**"\n    mode: allow\n')
    config = write_config(tmp_path / "config.yaml", faults.url)
    pullgate = make_pullgate(upstreams={}, config=config, policy=policy, workers=2)
    status, _, _ = fetch(pullgate, f"/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}")
    assert status == 200
    for _ in range(8):  # new connections: spread over both workers
        status, body, _ = get_json(pullgate, f"/v2/{pushed.repository}/blobs/{layer}?ns={REGISTRY}")
        assert status == 502, body
        message = body["errors"][0]["message"]
        assert f"Content-Length of {size - 4096} bytes" in message
        assert f"descriptor says {size} bytes" in message


def test_refuses_origin_dripping_a_manifest_body(
    tmp_path: Path,
    origin: Registry,
    faults: FaultProxy,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    """A manifest (read whole, then verified) is held to the same minimum rate as a
    blob: trickled just inside the read timeout it is cut, never served."""
    pushed = push(origin, "drip/manifest", size=4096)
    # 64 bytes at full speed, then 4 bytes every 0.2 s (20 bytes/s): a few hundred bytes
    # of manifest would take many seconds, far below the 64 KiB/s floor.
    faults.set_fault("/manifests/", trickle(64, piece=4, every=0.2))
    config = write_config(tmp_path / "config.yaml", faults.url)
    pullgate = make_pullgate(upstreams={}, config=config)
    status, body, _ = get_json(
        pullgate, f"/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}"
    )
    # By tag, with no copy of it to serve instead: the upstream counts as unavailable.
    assert status == 503, body
    (error,) = body["errors"]
    assert error["code"] == "UPSTREAM_UNAVAILABLE"
    assert "below the minimum rate" in error["message"]
    assert faults.hits("/manifests/") >= 1
