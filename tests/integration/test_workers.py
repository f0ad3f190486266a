"""``pullgate serve --workers 2`` with a real docker-registry upstream.

Each request goes over a new connection, so the kernel (SO_REUSEPORT) picks a worker
for it; which worker answered is read from ``pullgate_worker_responses_total{worker}``
(one scrape before and one after, on the admin port, which that counter leaves out).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2, api_pb2_grpc
from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_blob, push_image
from tests.support.peers import ROOT, Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
WORKERS = 2
# New connections tried before concluding the kernel never picks some worker: with two
# workers the chance of missing one is 2**-60.
TRIES = 60

POLICY = """\
default: deny
verdictCache: {positiveTTL: 2, negativeTTL: 1}
scopes:
  - match: "registry.example.test/**"
    require:
      cosign: {key: keys/release.pub}
"""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    worker: str


@dataclass
class Node:
    registry: Registry
    pullgate: Pullgate
    key: cs.TestKey

    def push_signed(self, repository: str, tag: str, seed: int) -> tuple[PushedArtifact, Digest]:
        """An image and its cosign signature; returns the signature manifest's digest."""
        pushed = self.push_unsigned(repository, tag, seed)
        payload = cs.simple_signing_payload(
            Digest.parse(pushed.manifest_digest), f"{REGISTRY}/{repository}"
        )
        signature = cs.signature_image(
            Digest.parse(pushed.manifest_digest), [cs.sign_layer(self.key, payload)]
        )
        return pushed, cs.push_to_registry(self.registry.url, repository, signature)

    def push_unsigned(self, repository: str, tag: str, seed: int) -> PushedArtifact:
        layers = [deterministic_bytes(16 * 1024, seed=seed + i) for i in range(2)]
        return push_image(self.registry.url, repository, tag, layers=layers)

    def responses(self) -> dict[str, float]:
        """Responses each worker slot sent on the registry port so far."""
        counts: dict[str, float] = {}
        for key, value in self.pullgate.metrics().items():
            match = re.fullmatch(r'pullgate_worker_responses_total\{worker="(\d+)"\}', key)
            if match:
                counts[match.group(1)] = value
        return counts

    def get(self, path: str) -> Reply:
        """GET ``path`` over a new connection; which worker answered it."""
        before = self.responses()
        host, port = self.pullgate.host.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(
                "GET", path, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
            )
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
        after = self.responses()
        moved = [w for w in after if after[w] != before.get(w, 0.0)]
        assert len(moved) == 1, f"expected one worker to answer, saw {before} -> {after}"
        return Reply(status, body, moved[0])

    def get_from(self, path: str, workers: Collection[str]) -> Reply:
        """GET ``path`` over new connections until one of ``workers`` answers."""
        for _ in range(TRIES):
            reply = self.get(path)
            if reply.worker in workers:
                return reply
        raise AssertionError(f"no wanted worker answered {path} in {TRIES} connections")

    def delete_manifest(self, repository: str, digest: Digest) -> None:
        request = urllib.request.Request(
            f"{self.registry.url}/v2/{repository}/manifests/{digest}", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202


ALL_WORKERS = frozenset(str(w) for w in range(WORKERS))


def manifest_path(repository: str, reference: str) -> str:
    return f"/v2/{repository}/manifests/{reference}?ns={REGISTRY}"


def blob_path(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}?ns={REGISTRY}"


def denied(reply: Reply) -> str:
    """The 403 DENIED message (fails if the reply is anything else)."""
    assert reply.status == 403, (reply.status, reply.body[:300])
    [error] = json.loads(reply.body)["errors"]
    assert error["code"] == "DENIED"
    return str(error["message"])


@pytest.fixture
def node(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> Iterator[Node]:
    key = cs.generate_key()
    policy_dir = tmp_path / "policy"
    key.write_public(policy_dir / "keys" / "release.pub")
    (policy_dir / "policy.yaml").write_text(POLICY)
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, policy=policy_dir / "policy.yaml", workers=WORKERS
    )
    assert len(pullgate.worker_pids()) == WORKERS
    yield Node(registry, pullgate, key)


def test_a_blob_whose_manifest_another_worker_verified_is_served(node: Node) -> None:
    pushed, _ = node.push_signed("team/app", "v1", seed=100)
    verified = node.get(manifest_path("team/app", "v1"))
    assert verified.status == 200, verified.body[:300]
    layer = pushed.layer_digests[0]
    reply = node.get_from(blob_path("team/app", layer), ALL_WORKERS - {verified.worker})
    assert reply.status == 200, reply.body[:300]
    assert Digest.parse(layer).matches(reply.body)
    # Served by digest too, by the other worker, on the first worker's decision.
    by_digest = node.get_from(
        manifest_path("team/app", pushed.manifest_digest), ALL_WORKERS - {verified.worker}
    )
    assert by_digest.status == 200 and by_digest.body == pushed.manifest_bytes


def test_a_blob_no_verified_manifest_references_is_refused_by_every_worker(node: Node) -> None:
    signed, _ = node.push_signed("team/app", "v1", seed=200)
    assert node.get(manifest_path("team/app", "v1")).status == 200
    unsigned = node.push_unsigned("team/app", "unsigned", seed=300)
    refused = node.get(manifest_path("team/app", "unsigned"))
    assert "no cosign signature verified" in denied(refused)
    stray = push_blob(node.registry.url, "team/app", b"a blob no manifest references")
    for digest in (stray, unsigned.layer_digests[0]):
        seen: set[str] = set()
        while seen != ALL_WORKERS:
            reply = node.get_from(blob_path("team/app", digest), ALL_WORKERS - seen)
            assert "not referenced by any verified manifest" in denied(reply)
            seen.add(reply.worker)
        assert node.registry.blob_gets(digest) == 0, "a refused blob left the registry"
    # Nor is a verified blob an oracle for another repository.
    other = node.get(blob_path("other/app", signed.layer_digests[0]))
    assert "not referenced by any verified manifest" in denied(other)


def test_a_refusal_in_one_worker_closes_the_blobs_in_every_worker(node: Node) -> None:
    pushed, signature = node.push_signed("team/revoked", "v1", seed=400)
    layer = blob_path("team/revoked", pushed.layer_digests[0])
    assert node.get(manifest_path("team/revoked", "v1")).status == 200
    for worker in map(str, range(WORKERS)):  # every worker holds the allowance now
        assert node.get_from(layer, {worker}).status == 200
    node.delete_manifest("team/revoked", signature)
    time.sleep(2.5)  # the positive verdict TTL (2 s) runs out
    refusal = node.get(manifest_path("team/revoked", pushed.manifest_digest))
    assert "no cosign signature verified" in denied(refusal)
    for worker in map(str, range(WORKERS)):
        reply = node.get_from(layer, {worker})
        assert "not referenced by any verified manifest" in denied(reply)


def test_one_scrape_shows_every_worker(node: Node) -> None:
    base = 'pullgate_requests_total{endpoint="base",method="GET",status="200"}'
    earlier = node.pullgate.metrics().get(base, 0.0)  # the fixture's readiness checks
    requests = 40
    for _ in range(requests):
        assert node.get("/v2/").status == 200
    per_worker = node.responses()
    assert sorted(per_worker) == [str(w) for w in range(WORKERS)]
    assert all(count > 0 for count in per_worker.values()), per_worker
    samples = node.pullgate.metrics()
    assert samples[base] == earlier + requests  # one counter, added up over the workers
    for worker in range(WORKERS):
        assert samples[f'pullgate_worker_starts_total{{worker="{worker}"}}'] == 1
    # The registry port's /metrics renders the same aggregate.
    with urllib.request.urlopen(f"{node.pullgate.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert f"{base} {earlier + requests + 0.0}" in text


def test_sigterm_stops_every_worker_and_exits_0(node: Node) -> None:
    pullgate = node.pullgate
    workers = pullgate.worker_pids()
    [runtime] = re.findall(r"runtime directory (\S+)", pullgate.log_text())
    assert Path(runtime).is_dir()
    assert pullgate.process is not None
    pullgate.process.send_signal(signal.SIGTERM)
    assert pullgate.process.wait(timeout=60) == 0, pullgate.log_text()[-3000:]
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} outlived it"
    assert not Path(runtime).exists(), "the runtime directory was left behind"


def test_sigterm_stops_a_single_process_with_exit_0(
    registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, workers=1)
    assert pullgate.worker_pids() == []  # no supervisor: the process serves itself
    assert pullgate.process is not None
    pullgate.process.send_signal(signal.SIGTERM)
    assert pullgate.process.wait(timeout=60) == 0, pullgate.log_text()[-3000:]
    assert "stopped" in pullgate.log_text()


def test_a_killed_worker_is_restarted_and_the_service_keeps_answering(node: Node) -> None:
    pushed, _ = node.push_signed("team/app", "v1", seed=500)
    assert node.get(manifest_path("team/app", "v1")).status == 200
    before = node.pullgate.worker_pids()
    victim = before[-1]
    os.kill(victim, signal.SIGKILL)
    # Reaped by the supervisor: every thread of it is gone, and with them its listening
    # socket (connections the kernel queued there before are reset: containerd retries).
    deadline = time.monotonic() + 30
    while f"(pid {victim}) was killed by SIGKILL" not in node.pullgate.log_text():
        assert time.monotonic() < deadline, node.pullgate.log_text()[-3000:]
        time.sleep(0.01)
    # The other worker answers every new connection meanwhile.
    for _ in range(10):
        assert node.get("/v2/").status == 200
    deadline = time.monotonic() + 30
    while node.pullgate.log_text().count(" ready\n") < WORKERS + 1:
        assert time.monotonic() < deadline, node.pullgate.log_text()[-3000:]
        time.sleep(0.05)
    after = node.pullgate.worker_pids()
    assert len(after) == WORKERS and victim not in after
    log = node.pullgate.log_text()
    assert re.search(rf"\(pid {victim}\) was killed by SIGKILL .*restarting it in", log)
    starts = {
        match.group(1): value
        for key, value in node.pullgate.metrics().items()
        if (match := re.fullmatch(r'pullgate_worker_starts_total\{worker="(\d+)"\}', key))
    }
    assert sorted(starts.values()) == [1.0, 2.0], starts
    [restarted] = [worker for worker, count in starts.items() if count == 2.0]
    # The restarted worker serves what was verified before it started.
    reply = node.get_from(blob_path("team/app", pushed.layer_digests[0]), {restarted})
    assert reply.status == 200 and Digest.parse(pushed.layer_digests[0]).matches(reply.body)


MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")
QUEUED_CONNECTIONS = 16


@pytest.fixture
def tcp_migrate_req() -> Iterator[Callable[[str], None]]:
    """Set ``net.ipv4.tcp_migrate_req`` for one test; the old value comes back after."""
    if not os.access(MIGRATE_SYSCTL, os.W_OK):
        pytest.skip(f"needs a writable {MIGRATE_SYSCTL} (root, Linux 5.14 or later)")
    old = MIGRATE_SYSCTL.read_text()
    yield lambda value: MIGRATE_SYSCTL.write_text(value)
    MIGRATE_SYSCTL.write_text(old)


def _kill_with_connections_queued(node: Node) -> list[socket.socket]:
    """Stop one worker, queue requests on its listener, kill it; the queued connections.

    While the worker is stopped, the kernel still completes connections hashed to its
    SO_REUSEPORT socket and queues them there; those the other worker does not answer
    within a few seconds are the queued ones.
    """
    victim = node.pullgate.worker_pids()[-1]
    host, port = node.pullgate.host.rsplit(":", 1)
    os.kill(victim, signal.SIGSTOP)
    try:
        connections = []
        for _ in range(QUEUED_CONNECTIONS):
            conn = socket.create_connection((host, int(port)), timeout=30)
            conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: pullgate\r\nConnection: close\r\n\r\n")
            connections.append(conn)
        time.sleep(3)
        queued = []
        for conn in connections:
            conn.setblocking(False)
            try:
                answered = conn.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                answered = False
            conn.setblocking(True)
            if answered:
                conn.close()
            else:
                queued.append(conn)
        # With 16 connections, the kernel puts none on the stopped worker 1 time in 2**16.
        assert queued, "every connection went to the running worker"
        assert len(queued) < QUEUED_CONNECTIONS, "the running worker answered nothing"
    finally:
        os.kill(victim, signal.SIGKILL)
    return queued


def _answer(conn: socket.socket) -> bytes:
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


def test_connections_queued_on_a_killed_worker_are_answered_by_another_worker(
    tcp_migrate_req: Callable[[str], None], node: Node
) -> None:
    tcp_migrate_req("1")
    queued = _kill_with_connections_queued(node)
    for conn in queued:
        assert _answer(conn).startswith(b"HTTP/1.1 200 "), "a queued connection was lost"


def test_without_tcp_migrate_req_a_killed_worker_resets_its_queued_connections(
    tcp_migrate_req: Callable[[str], None], node: Node
) -> None:
    # What pullgate warns about at start and `pullgate doctor` reports: the kernel's
    # default, shown so the test above is known to test something.
    tcp_migrate_req("0")
    queued = _kill_with_connections_queued(node)
    for conn in queued:
        try:
            answer = _answer(conn)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", answer[:200]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


# ---- with a cache: restart continuity and outages -----------------------------------------
# These tests do not count fetches: one fetch per blob across the workers is
# tests/integration/test_workers_cache.py's subject.


def cached_node(tmp_path: Path, node: Node, make_pullgate: Callable[..., Pullgate]) -> Node:
    """``node``'s registry and key, behind a second pullgate with a cache."""
    config = tmp_path / "cached.yaml"
    config.write_text("cache:\n  tagStaleness: 600\n")
    assert node.pullgate.policy is not None
    policy = node.pullgate.policy.with_name("default-ttl.yaml")  # verdicts last 300 s
    policy.write_text(POLICY.replace("verdictCache: {positiveTTL: 2, negativeTTL: 1}\n", ""))
    pullgate = make_pullgate(
        upstreams={REGISTRY: node.registry.url},
        policy=policy,
        cache_dir=tmp_path / "cache",
        config=config,
        workers=WORKERS,
    )
    node.pullgate.stop()
    return Node(node.registry, pullgate, node.key)


def test_after_a_node_restart_every_worker_serves_a_pull_in_flight(
    tmp_path: Path, node: Node, make_pullgate: Callable[..., Pullgate]
) -> None:
    cached = cached_node(tmp_path, node, make_pullgate)
    pushed, _ = cached.push_signed("team/rollout", "v1", seed=600)
    assert cached.get(manifest_path("team/rollout", "v1")).status == 200
    cached.pullgate.restart()  # a DaemonSet rollout in the middle of the pull
    # Worker 0 verifies the recent verdicts again; the others wait for it, not refuse.
    for layer in pushed.layer_digests:
        for worker in sorted(ALL_WORKERS):
            reply = cached.get_from(blob_path("team/rollout", layer), {worker})
            assert reply.status == 200 and Digest.parse(layer).matches(reply.body)


def test_with_the_upstream_down_a_manifest_served_from_the_cache_frees_its_blobs_everywhere(
    tmp_path: Path, node: Node, make_pullgate: Callable[..., Pullgate]
) -> None:
    cached = cached_node(tmp_path, node, make_pullgate)
    pushed, _ = cached.push_signed("team/offline", "v1", seed=700)
    assert cached.get(manifest_path("team/offline", "v1")).status == 200
    layer = pushed.layer_digests[0]
    for worker in sorted(ALL_WORKERS):  # cached, and in every worker's index
        assert cached.get_from(blob_path("team/offline", layer), {worker}).status == 200
    cached.registry.stop()
    cached.pullgate.restart()  # fresh processes: only the disk remembers the verdict
    served = cached.get(manifest_path("team/offline", pushed.manifest_digest))
    assert served.status == 200 and served.body == pushed.manifest_bytes
    reply = cached.get_from(blob_path("team/offline", layer), ALL_WORKERS - {served.worker})
    assert reply.status == 200 and Digest.parse(layer).matches(reply.body)


# ---- start-up failures --------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_a_policy_that_does_not_load_stops_the_start_with_exit_2(
    tmp_path: Path, registry: Registry, workers: int
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("scopes:\n  - match: '**'\n    require: {anyOf: []}\n")
    pullgate = Pullgate(
        tmp_path / "pullgate", upstreams={REGISTRY: registry.url}, policy=policy, workers=workers
    )
    done = subprocess.run(
        pullgate.argv(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "policy error" in done.stderr
    assert "serving on" not in done.stdout


def test_workers_refuse_a_port_something_else_listens_on(
    tmp_path: Path, registry: Registry
) -> None:
    pullgate = Pullgate(tmp_path / "pullgate", upstreams={REGISTRY: registry.url}, workers=WORKERS)
    with socket.socket() as squatter:
        # A listener with SO_REUSEPORT would otherwise silently share the connections.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", pullgate.port))
        squatter.listen()
        done = subprocess.run(
            pullgate.argv(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{pullgate.port}" in done.stderr


# ---- real clients -------------------------------------------------------------------------


def test_containerd_and_the_cri_pull_through_two_workers(
    tmp_path: Path, node: Node, containerd: Containerd, make_pullgate: Callable[..., Pullgate]
) -> None:
    """Worker 0 serves the CRI socket and verifies there; containerd then fetches through
    whichever workers the kernel picks, which serve on worker 0's decision."""
    cri_socket = tmp_path / "pullgate-cri.sock"
    assert node.pullgate.policy is not None
    pullgate = make_pullgate(
        upstreams={REGISTRY: node.registry.url},
        policy=node.pullgate.policy,
        workers=WORKERS,
        extra_args=[
            "--cri-listen", f"unix://{cri_socket}",
            "--cri-runtime-endpoint", f"unix://{containerd.socket}",
        ],
    )  # fmt: skip
    node.pullgate.stop()
    node = Node(node.registry, pullgate, node.key)
    containerd.write_hosts(REGISTRY, pullgate.url)
    signed, _ = node.push_signed("team/cri", "v1", seed=800)
    unsigned = node.push_unsigned("team/cri", "unsigned", seed=900)
    before = node.responses()
    with grpc.insecure_channel(f"unix://{cri_socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
        pulled = images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=f"{REGISTRY}/team/cri:v1")),
            timeout=120,
        )
        assert pulled.image_ref.startswith("sha256:")
        with pytest.raises(grpc.RpcError) as refused:
            images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/team/cri:unsigned")
                ),
                timeout=120,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        listed = images.ListImages(api_pb2.ListImagesRequest(), timeout=30)
    # containerd was asked for the verified digest (never the tag), and holds only it.
    digests = {d for image in listed.images for d in image.repo_digests}
    assert digests == {f"{REGISTRY}/team/cri@{signed.manifest_digest}"}
    assert all(node.registry.blob_gets(blob) >= 1 for blob in signed.blobs)
    assert sum(node.registry.blob_gets(blob) for blob in unsigned.blobs) == 0
    after = node.responses()
    assert sum(after.values()) - sum(before.values()) >= 1 + len(signed.blobs), (
        "containerd did not fetch through pullgate"
    )
