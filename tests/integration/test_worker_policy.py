"""A worker (re)started while the policy file on disk is broken.

Real workers (``pullgate serve --workers 2``) in front of Debian's ``docker-registry``:
a worker is killed with SIGKILL after the policy file (or a key it names) was broken,
and the worker that replaces it must serve the last good policy from the supervisor's
snapshot, neither crash-looping nor serving anything unverified; once the file is
valid again every worker reloads it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_workers import (
    REGISTRY,
    WORKERS,
    Node,
    Reply,
    blob_path,
    denied,
    manifest_path,
)
from tests.support import cosign_sign as cs
from tests.support.peers import Pullgate, Registry, free_port
from tests.support.pki_sign import issue

pytestmark = pytest.mark.integration

POLICY = """\
default: deny
verdictCache: {positiveTTL: 1, negativeTTL: 1}
scopes:
  - match: "registry.example.test/**"
    require:
      cosign: {key: keys/release.pub}
"""
# The fixed file: a new revision that lets team/open through, so its reload shows.
FIXED_POLICY = (
    POLICY
    + """\
  - match: "registry.example.test/team/open"
    mode: allow
"""
)
SNAPSHOT_GAUGE = "pullgate_policy_snapshot_in_use"
WAIT = 60.0


@dataclass
class PolicyNode:
    node: Node
    policy: Path
    key_file: Path

    @property
    def pullgate(self) -> Pullgate:
        return self.node.pullgate

    def log(self) -> str:
        return self.pullgate.log_text()

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            assert time.monotonic() < deadline, f"{what}; log:\n{self.log()[-4000:]}"
            time.sleep(0.05)

    def kill_a_worker(self) -> str:
        """SIGKILL the last worker; wait until its replacement is ready; its slot."""
        ready_before = self.log().count(" ready\n")
        victim = self.pullgate.worker_pids()[-1]
        os.kill(victim, signal.SIGKILL)
        self.wait_for(
            "the killed worker was not restarted",
            lambda: self.log().count(" ready\n") > ready_before,
        )
        assert victim not in self.pullgate.worker_pids()
        starts = {
            match.group(1): value
            for key, value in self.pullgate.metrics().items()
            if (match := re.fullmatch(r'pullgate_worker_starts_total\{worker="(\d+)"\}', key))
        }
        [restarted] = [slot for slot, count in starts.items() if count == 2.0]
        return restarted


@pytest.fixture
def policy_node(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> Iterator[PolicyNode]:
    key = cs.generate_key()
    policy_dir = tmp_path / "policy"
    key_file = policy_dir / "keys" / "release.pub"
    key.write_public(key_file)
    policy = policy_dir / "policy.yaml"
    policy.write_text(POLICY)
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy, workers=WORKERS)
    assert len(pullgate.worker_pids()) == WORKERS
    yield PolicyNode(Node(registry, pullgate, key), policy, key_file)


def _refused_for_its_signature(reply: Reply) -> None:
    message = denied(reply)
    assert "cosign" in message and "keys/release.pub" in message, message


BREAKS = {
    # A YAML edit that does not parse.
    "yaml": lambda n: n.policy.write_text(POLICY.replace("require:", "require: [")),
    # A key the policy names replaced with something that is no key.
    "key": lambda n: n.key_file.write_text("-----BEGIN PUBLIC KEY-----\nbroken\n"),
    # The policy file removed (a ConfigMap deleted under the pod).
    "missing": lambda n: n.policy.unlink(),
}


@pytest.mark.parametrize("broken", sorted(BREAKS))
def test_refuses_to_crash_loop_on_broken_policy_after_start(
    policy_node: PolicyNode, broken: str
) -> None:
    node = policy_node
    signed, _ = node.node.push_signed("team/app", "v1", seed=700)
    unsigned = node.node.push_unsigned("team/open", "v1", seed=710)
    _refused_for_its_signature(node.node.get(manifest_path("team/open", "v1")))

    BREAKS[broken](node)
    # 1. The running workers refuse the broken file and keep the policy in force.
    node.wait_for(
        "the running workers did not refuse the broken file",
        lambda: node.pullgate.metrics().get("pullgate_policy_reload_failures_total", 0) >= WORKERS,
    )
    assert "policy reload REFUSED" in node.log()
    time.sleep(1.5)  # past the verdict TTLs: the workers decide again, under the kept policy
    for slot in (str(w) for w in range(WORKERS)):
        _refused_for_its_signature(node.node.get_from(manifest_path("team/open", "v1"), {slot}))
        assert node.node.get_from(manifest_path("team/app", "v1"), {slot}).status == 200

    # 2. A worker that starts now serves the last good policy from the snapshot.
    restarted = node.kill_a_worker()
    log = node.log()
    assert "failed to start" not in log and "exited with code 2" not in log
    assert re.search(
        r"does not load: serving the last good policy snapshot, revision [0-9a-f]{16}", log
    ), log[-4000:]
    assert node.pullgate.metrics()[SNAPSHOT_GAUGE] == 1.0
    reply = node.node.get_from(manifest_path("team/app", "v1"), {restarted})
    assert reply.status == 200, reply.body[:300]
    reply = node.node.get_from(blob_path("team/app", signed.layer_digests[0]), {restarted})
    assert reply.status == 200
    _refused_for_its_signature(node.node.get_from(manifest_path("team/open", "v1"), {restarted}))
    # No worker slot was left restarting (a crash loop would keep restarting it).
    time.sleep(1.5)
    assert "restarting it in" not in node.log().split(" ready\n")[-1]
    assert len(node.pullgate.worker_pids()) == WORKERS

    # 3. The fixed file goes into force in every worker, the restarted one included.
    node.key_file.parent.mkdir(parents=True, exist_ok=True)
    node.node.key.write_public(node.key_file)
    node.policy.write_text(FIXED_POLICY)
    node.wait_for(
        "the restarted worker did not leave the snapshot",
        lambda: node.pullgate.metrics().get(SNAPSHOT_GAUGE) == 0.0,
    )
    for slot in sorted({restarted, *(str(w) for w in range(WORKERS))}):
        node.wait_for(
            f"worker {slot} did not reload the fixed policy",
            lambda slot=slot: (
                node.node.get_from(manifest_path("team/open", "v1"), {slot}).status == 200
            ),
        )
    assert re.search(r"policy file \S+ loads again", node.log())
    assert unsigned.manifest_digest


def test_refuses_to_serve_unverified_when_the_snapshot_is_broken_too(
    policy_node: PolicyNode,
) -> None:
    """Neither the file nor the snapshot loads: the worker does not start (the
    supervisor retries it) and the other worker keeps refusing unsigned content."""
    node = policy_node
    node.node.push_unsigned("team/open", "v1", seed=720)
    node.policy.write_text("scopes: [")
    node.wait_for(
        "the running workers did not refuse the broken file",
        lambda: node.pullgate.metrics().get("pullgate_policy_reload_failures_total", 0) >= WORKERS,
    )
    runtime = _runtime_dir(node)
    for snapshot in (runtime / "policy-snapshots").iterdir():
        (snapshot / "policy.yaml").write_text("default: allow\n")
    victim = node.pullgate.worker_pids()[-1]
    os.kill(victim, signal.SIGKILL)
    node.wait_for(
        "the restarted worker did not refuse the tampered snapshot",
        lambda: "exited with code 2" in node.log(),
    )
    assert "does not match its revision" in node.log()
    for _ in range(10):
        reply = node.node.get(manifest_path("team/open", "v1"))
        _refused_for_its_signature(reply)


def _runtime_dir(node: PolicyNode) -> Path:
    match = re.search(r"runtime directory (\S+)", node.log())
    assert match, node.log()[-2000:]
    return Path(match.group(1))


def test_snapshot_meta_names_the_revision_in_force(policy_node: PolicyNode) -> None:
    runtime = _runtime_dir(policy_node)
    meta = json.loads((runtime / "policy-snapshot" / "meta.json").read_text())
    revisions = {
        key
        for key, value in policy_node.pullgate.metrics().items()
        if key.startswith("pullgate_policy_info{") and value == 1.0
    }
    assert any(meta["revision"][:16] in key for key in revisions), (meta, revisions)


# ---- files the config names ---------------------------------------------------------


def test_refuses_to_crash_loop_on_a_ca_file_broken_after_start(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    """The config is read once; a worker started later must not fail on a CA file
    (a transport's, read when it starts) that was broken since."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issue("transport CA", ca=True, key_usage="ca").pem)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstreams:\n  {REGISTRY}:\n    url: {registry.url}\n"
        f"    transports:\n      - {{name: peer, url: 'http://127.0.0.1:{free_port()}',"
        f" caFile: {ca}}}\n"
        f"defaultUpstream: {REGISTRY}\n"
    )
    pullgate = make_pullgate(upstreams={}, config=config, workers=WORKERS)
    key = cs.generate_key()
    node = PolicyNode(Node(registry, pullgate, key), tmp_path / "none", tmp_path / "none")
    pushed = node.node.push_unsigned("team/app", "v1", seed=730)
    ca.write_text("not a certificate\n")
    restarted = node.kill_a_worker()
    log = node.log()
    assert "cannot serve" not in log and "exited with code" not in log, log[-3000:]
    reply = node.node.get_from(blob_path("team/app", pushed.layer_digests[0]), {restarted})
    assert reply.status == 200
