"""The wiring point: what a node builds, what it runs while running, what each worker
role runs, and the restart-restore hand-off between workers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.cache import NoStore
from proxy.cache.disk import DiskBlobStore
from proxy.config import CacheConfig, Config, UpstreamConfig, validate
from proxy.node import ALLOWANCES_FILE, Node, Role
from proxy.pipeline.gate import AllowAllGate
from proxy.pipeline.shared import SharedAllowances
from proxy.verify.signature_gate import COVERED, SignatureGate
from tests.support import cosign_sign as cs

REGISTRY = "registry.example.test"


def node_config(tmp_path: Path, *, policy: bool = False, cache: bool = False) -> Config:
    policy_path = None
    if policy:
        cs.generate_key().write_public(tmp_path / "keys" / "release.pub")
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(
            "scopes:\n  - match: 'registry.example.test/**'\n"
            "    require: {cosign: {key: keys/release.pub}}\n"
        )
    return validate(
        Config(
            admin_listen=None,
            upstreams={REGISTRY: UpstreamConfig(name=REGISTRY, url="http://127.0.0.1:9")},
            default_upstream=REGISTRY,
            policy=policy_path,
            cache=replace(CacheConfig(), dir=tmp_path / "cache" if cache else None),
        )
    )


def runtime(tmp_path: Path, *, restore_pending: bool = False) -> Path:
    directory = tmp_path / "runtime"
    directory.mkdir()
    SharedAllowances.create(directory / ALLOWANCES_FILE, restore_pending=restore_pending)
    return directory


async def test_a_running_node_has_a_router_and_stops_what_it_started(tmp_path: Path) -> None:
    node = Node.build(node_config(tmp_path))
    assert isinstance(node.gate, AllowAllGate) and isinstance(node.store, NoStore)
    with pytest.raises(RuntimeError, match="not running"):
        _ = node.router
    before = set(asyncio.all_tasks())
    async with node.running():
        assert node.router.route(None).registry == REGISTRY
        assert node.metrics.worker_starts.labels("0")._value.get() == 1
    assert set(asyncio.all_tasks()) == before  # nothing left running
    with pytest.raises(RuntimeError, match="not running"):
        _ = node.router


async def test_a_node_with_a_policy_watches_it_and_gates_with_it(tmp_path: Path) -> None:
    node = Node.build(node_config(tmp_path, policy=True))
    assert isinstance(node.gate, SignatureGate) and node.watcher is not None
    async with node.running():
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert "policy-watcher" in names


async def test_a_single_process_shares_nothing(tmp_path: Path) -> None:
    node = Node.build(node_config(tmp_path, policy=True, cache=True))
    assert node.shared is None and node.pipeline.shared is None


def test_workers_of_a_node_share_its_allowance_store(tmp_path: Path) -> None:
    directory = runtime(tmp_path)
    config = node_config(tmp_path, policy=True)
    nodes = [Node.build(config, Role(index=i, workers=2, runtime_dir=directory)) for i in (0, 1)]
    for node in nodes:
        assert node.shared is not None and node.shared.path == directory / ALLOWANCES_FILE
        assert node.pipeline.shared is node.shared
        assert node.metrics.worker == str(node.role.index)


async def test_only_worker_0_scrubs_the_cache(tmp_path: Path) -> None:
    directory = runtime(tmp_path)
    config = node_config(tmp_path, policy=True, cache=True)
    for index, scrubs in ((0, True), (1, False)):
        node = Node.build(config, Role(index=index, workers=2, runtime_dir=directory))
        assert isinstance(node.store, DiskBlobStore)
        async with node.running():
            names = {task.get_name() for task in asyncio.all_tasks()}
            assert ("cache-scrub" in names) is scrubs


async def test_worker_0_restores_and_the_others_wait_for_it(tmp_path: Path) -> None:
    directory = runtime(tmp_path, restore_pending=True)
    config = node_config(tmp_path, policy=True, cache=True)
    marker = SharedAllowances(directory / ALLOWANCES_FILE, covered_fingerprint=COVERED)
    waiting = Node.build(config, Role(index=1, workers=2, runtime_dir=directory))
    async with waiting.running():
        restoring = waiting.pipeline.restoring
        assert restoring is not None
        await asyncio.sleep(0.3)
        assert not restoring.done()  # blob checks that would fail wait for this
        restorer = Node.build(config, Role(index=0, workers=2, runtime_dir=directory))
        async with restorer.running():
            assert restorer.pipeline.restoring is not None
            await asyncio.wait_for(restorer.pipeline.restoring, 30)
            await asyncio.wait_for(restoring, 30)
        assert not marker.restore_pending()
    # A worker started after that (a restart) restores nothing and waits for nothing.
    restarted = Node.build(config, Role(index=0, workers=2, runtime_dir=directory))
    async with restarted.running():
        assert restarted.pipeline.restoring is None
