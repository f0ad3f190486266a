"""The supervisor's snapshot of the last good policy, and a worker's use of it."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from proxy.node import Node, Role
from proxy.node.policy_snapshot import (
    CURRENT_LINK,
    SNAPSHOTS_DIR,
    TREE_DIR,
    SnapshotKeeper,
    load_snapshot,
    take_snapshot,
)
from proxy.verify.base import PolicyError
from proxy.verify.policy import load_policy
from proxy.verify.signature_gate import SignatureGate
from tests.support import cosign_sign as cs
from tests.unit.test_node import node_config, runtime

POLICY = (
    "default: deny\n"
    "scopes:\n  - match: 'registry.example.test/**'\n"
    "    require: {cosign: {key: keys/release.pub}}\n"
)


def _policy_dir(tmp_path: Path, policy: str = POLICY) -> Path:
    directory = tmp_path / "etc" / "policy"
    cs.generate_key().write_public(directory / "keys" / "release.pub")
    (directory / "policy.yaml").write_text(policy)
    return directory / "policy.yaml"


def test_a_snapshot_loads_with_the_revision_of_the_file(tmp_path: Path) -> None:
    path = _policy_dir(tmp_path)
    work = runtime(tmp_path)
    taken = take_snapshot(work, path)
    assert taken.revision == load_policy(path).revision
    snapshot = load_snapshot(work)
    assert snapshot is not None
    assert snapshot.policy.revision == taken.revision
    assert snapshot.policy.source == str(path)  # the same policy_info series as the file
    # The key is read from the copy, not from the policy's directory.
    assert all(str(p).startswith(str(snapshot.directory)) for p in snapshot.policy.material)


def test_a_snapshot_follows_dotdot_paths_into_its_own_copy(tmp_path: Path) -> None:
    keys = tmp_path / "etc" / "keys"
    cs.generate_key().write_public(keys / "release.pub")
    path = tmp_path / "etc" / "policy" / "policy.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(POLICY.replace("keys/release.pub", "../keys/release.pub"))
    work = runtime(tmp_path)
    revision = take_snapshot(work, path).revision
    (keys / "release.pub").write_text("not a key")
    snapshot = load_snapshot(work)
    assert snapshot is not None and snapshot.policy.revision == revision


def test_no_snapshot_is_none(tmp_path: Path) -> None:
    assert load_snapshot(runtime(tmp_path)) is None


def test_refuses_a_snapshot_whose_policy_was_altered(tmp_path: Path) -> None:
    work = runtime(tmp_path)
    take_snapshot(work, _policy_dir(tmp_path))
    (work / CURRENT_LINK / "policy.yaml").write_text("default: allow\n")
    with pytest.raises(PolicyError, match="does not match its revision"):
        load_snapshot(work)


def test_refuses_a_snapshot_whose_key_was_replaced(tmp_path: Path) -> None:
    work = runtime(tmp_path)
    path = _policy_dir(tmp_path)
    take_snapshot(work, path)
    [copied] = (work / CURRENT_LINK / TREE_DIR).rglob("release.pub")
    cs.generate_key().write_public(copied)
    with pytest.raises(PolicyError, match="does not match its revision"):
        load_snapshot(work)


def test_refuses_to_snapshot_a_policy_that_does_not_load(tmp_path: Path) -> None:
    work = runtime(tmp_path)
    path = _policy_dir(tmp_path, "scopes: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        take_snapshot(work, path)
    assert load_snapshot(work) is None


def test_the_keeper_snapshots_each_revision_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = runtime(tmp_path)
    path = _policy_dir(tmp_path)
    keeper = SnapshotKeeper(runtime=work, policy_path=path)
    first = keeper.start().revision
    path.write_text(POLICY.replace("deny", "warn"))
    keeper.check()
    second = keeper.revision
    assert second not in (None, first)
    # A rotated key is a new revision, though the YAML did not change.
    cs.generate_key().write_public(path.parent / "keys" / "release.pub")
    keeper.check()
    third = keeper.revision
    assert third not in (first, second)
    with caplog.at_level(logging.ERROR, "pullgate.policy"):
        path.write_text("scopes: [\n")
        keeper.check()
        keeper.check()  # the same failure is said once
    said = [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()]
    assert len(said) == 1, said
    snapshot = load_snapshot(work)
    assert snapshot is not None and snapshot.policy.revision == third == keeper.revision
    # The current one and one before it are kept.
    kept = sorted(p.name for p in (work / SNAPSHOTS_DIR).iterdir())
    assert kept == sorted([second, third]) or kept == sorted([first, third])
    assert len(kept) == 2


def test_the_keeper_refuses_to_start_on_a_policy_that_does_not_load(tmp_path: Path) -> None:
    keeper = SnapshotKeeper(runtime=runtime(tmp_path), policy_path=_policy_dir(tmp_path, "x: ["))
    with pytest.raises(PolicyError):
        keeper.start()


def _worker_config(tmp_path: Path) -> tuple[Path, Path, Role]:
    config_dir = tmp_path / "node"
    config_dir.mkdir()
    work = runtime(tmp_path)
    return config_dir, work, Role(index=1, workers=2, runtime_dir=work)


def test_refuses_to_crash_on_a_broken_policy_file_when_a_snapshot_exists(
    tmp_path: Path,
) -> None:
    config_dir, work, role = _worker_config(tmp_path)
    config = node_config(config_dir, policy=True)
    assert config.policy is not None
    revision = take_snapshot(work, config.policy).revision
    config.policy.write_text("scopes: [\n")
    node = Node.build(config, role)
    try:
        assert isinstance(node.gate, SignatureGate) and node.gate.revision == revision
        assert node.metrics.policy_snapshot_in_use._value.get() == 1
        watcher = node.watcher
        assert watcher is not None and watcher.snapshot is not None
        assert not watcher.check_once()  # still broken: the snapshot stays
        assert node.metrics.policy_snapshot_in_use._value.get() == 1
        # Fixed back to the same bytes: the same revision, no swap, but the file is back.
        config.policy.write_bytes((work / CURRENT_LINK / "policy.yaml").read_bytes())
        assert not watcher.check_once()
        assert watcher.snapshot is None
        assert node.metrics.policy_snapshot_in_use._value.get() == 0
        # From now on the files on disk are watched, not the snapshot's copies: a key
        # rotated under the same YAML is a new revision here too.
        cs.generate_key().write_public(config.policy.parent / "keys" / "release.pub")
        assert watcher.check_once()
        assert node.gate.revision not in (revision, "")
    finally:
        assert node.shared is not None
        node.shared.close()


def test_refuses_to_serve_without_policy_when_file_and_snapshot_are_broken(
    tmp_path: Path,
) -> None:
    config_dir, work, role = _worker_config(tmp_path)
    config = node_config(config_dir, policy=True)
    assert config.policy is not None
    take_snapshot(work, config.policy)
    config.policy.write_text("scopes: [\n")
    (work / CURRENT_LINK / "meta.json").write_text("{")
    with pytest.raises(PolicyError, match=r"snapshot .* is unreadable"):
        Node.build(config, role)


def test_refuses_a_broken_policy_file_without_a_snapshot(tmp_path: Path) -> None:
    config_dir, _, role = _worker_config(tmp_path)
    config = node_config(config_dir, policy=True)
    assert config.policy is not None
    config.policy.write_text("scopes: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        Node.build(config, role)


def test_a_single_process_never_uses_a_snapshot(tmp_path: Path) -> None:
    config_dir, work, _ = _worker_config(tmp_path)
    config = node_config(config_dir, policy=True)
    assert config.policy is not None
    take_snapshot(work, config.policy)
    config.policy.write_text("scopes: [\n")
    with pytest.raises(PolicyError):
        Node.build(config)  # no runtime dir: nothing to fall back on
    assert os.path.islink(work / CURRENT_LINK)


def test_a_snapshot_of_a_configmap_mount_survives_the_next_swap(tmp_path: Path) -> None:
    """The kubelet's layout: files are links through ``..data`` to a timestamped dir."""
    mount = tmp_path / "etc" / "pullgate" / "policy"
    first = mount / "..2026_12_03_08_00_00.1"
    cs.generate_key().write_public(first / "keys" / "release.pub")
    (first / "policy.yaml").write_text(POLICY)
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    (mount / "keys").symlink_to("..data/keys")
    path = mount / "policy.yaml"
    work = runtime(tmp_path)
    revision = take_snapshot(work, path).revision
    # The kubelet swaps in a broken edit and removes the old directory.
    second = mount / "..2026_12_03_09_00_00.2"
    (second / "keys").mkdir(parents=True)
    (second / "keys" / "release.pub").write_text("not a key")
    (second / "policy.yaml").write_text(POLICY)
    swap = mount / "..data_tmp"
    swap.symlink_to(second.name)
    swap.replace(mount / "..data")
    shutil.rmtree(first)
    with pytest.raises(PolicyError):
        load_policy(path)
    snapshot = load_snapshot(work)
    assert snapshot is not None and snapshot.policy.revision == revision


def test_refuses_to_serve_a_looser_snapshot_after_a_tightened_policy_broke_between_polls(
    tmp_path: Path,
) -> None:
    # The policy is tightened (warn -> enforce), a running worker puts it into force,
    # and the file breaks before the supervisor's next poll saw the tightened one. A
    # worker that starts now must serve the tightened policy its sibling serves, not
    # the looser one the supervisor saw last.
    config_dir, work, role = _worker_config(tmp_path)
    config = node_config(config_dir, policy=True)
    assert config.policy is not None
    tight = config.policy.read_text()
    loose = tight.replace("    require:", "    mode: warn\n    require:")
    assert loose != tight
    config.policy.write_text(loose)
    keeper = SnapshotKeeper(runtime=work, policy_path=config.policy)
    loose_revision = keeper.start().revision
    running = Node.build(config, role)
    restarted = None
    try:
        watcher = running.watcher
        assert watcher is not None
        assert running.gate.revision == loose_revision
        config.policy.write_text(tight)
        assert watcher.check_once()
        tight_revision = running.gate.revision
        assert tight_revision != loose_revision
        config.policy.write_text("scopes: [\n")
        keeper.check()  # the supervisor's poll: the file does not load now
        restarted = Node.build(config, role)
        assert restarted.watcher is not None and restarted.watcher.snapshot is not None
        assert restarted.gate.revision == tight_revision
    finally:
        for node in (running, restarted):
            if node is not None and node.shared is not None:
                node.shared.close()


def test_refuses_to_point_the_snapshot_back_to_an_older_read_of_the_file(
    tmp_path: Path,
) -> None:
    # Two processes snapshot the file: the one that read it earlier (a slow supervisor
    # poll) finishes last, and must not point the snapshot back to what it read.
    path = _policy_dir(tmp_path)
    work = runtime(tmp_path)
    old = path.read_bytes()
    new = old.replace(b"    require:", b"    mode: warn\n    require:")
    newer = take_snapshot(work, path, new, read_at=200.0)
    take_snapshot(work, path, old, read_at=100.0)
    snapshot = load_snapshot(work)
    assert snapshot is not None and snapshot.policy.revision == newer.revision
