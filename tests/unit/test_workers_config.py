"""``workers`` and ``runtimeDir``: config file, flags, the default, and the worker spec."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from proxy import config as config_module
from proxy.cli import build_parser, resolve_config
from proxy.config import (
    AUTO_WORKERS_MAX,
    DEFAULT_CONFIG,
    ConfigError,
    load_config_file,
    worker_count,
)
from proxy.node import CriEndpoints, Role
from proxy.node.supervisor import WorkerSpec, receive_spec, send_spec


def test_workers_default_to_one_per_core_at_most_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_CONFIG.workers is None
    monkeypatch.setattr(config_module, "usable_cores", lambda: 2)
    assert worker_count(DEFAULT_CONFIG) == 2
    monkeypatch.setattr(config_module, "usable_cores", lambda: 64)
    assert worker_count(DEFAULT_CONFIG) == AUTO_WORKERS_MAX
    # An explicit number is taken as given, even above the automatic cap.
    assert worker_count(replace(DEFAULT_CONFIG, workers=12)) == 12


def test_usable_cores_is_at_least_one_and_at_most_the_affinity() -> None:
    import os

    assert 1 <= config_module.usable_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("text", "workers"), [("4", 4), ("auto", None), ("1", 1)])
def test_workers_from_the_config_file(tmp_path: Path, text: str, workers: int | None) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"workers: {text}\nruntimeDir: run\n")
    loaded = load_config_file(path)
    assert loaded.workers == workers
    assert loaded.runtime_dir == tmp_path / "run"  # relative to the file


@pytest.mark.parametrize("text", ["0", "-1", "65", "two", "true", "1.5"])
def test_refuses_a_worker_count_that_is_not_one_to_64(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"workers: {text}\n")
    with pytest.raises(ConfigError, match="workers"):
        load_config_file(path)


def test_the_flag_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("workers: 4\n")
    args = build_parser().parse_args(["serve", "--config", str(path), "--workers", "2"])
    assert resolve_config(args).workers == 2
    args = build_parser().parse_args(["serve", "--config", str(path), "--workers", "auto"])
    assert resolve_config(args).workers is None
    with pytest.raises(ConfigError, match="--workers"):
        resolve_config(build_parser().parse_args(["serve", "--workers", "0"]))


def test_a_worker_spec_crosses_the_channel_intact(tmp_path: Path) -> None:
    config = load_config_file(_config_file(tmp_path))
    spec = WorkerSpec(
        config=config,
        role=Role(index=1, workers=3, runtime_dir=tmp_path),
        cri=CriEndpoints("unix:///run/pullgate/cri.sock", "unix:///run/containerd.sock"),
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        send_spec(ours, spec)
        assert receive_spec(theirs) == spec


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "listen: 127.0.0.1:5999\n"
        "upstreams: {registry.example.test: {url: 'http://127.0.0.1:5000'}}\n"
        "defaultUpstream: registry.example.test\n"
        "cache: {dir: cache, maxBytes: 1G}\n"
        "workers: 3\n"
    )
    return path


def test_direct_min_bytes_from_the_config_file_and_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("cache: {dir: cache, directMinBytes: 8M}\n")
    args = build_parser().parse_args(["serve", "--config", str(path)])
    assert resolve_config(args).cache.direct_min_bytes == 8 * 1024**2
    for flag, expected in (("0", 0), ("1G", 1024**3)):
        args = build_parser().parse_args(
            ["serve", "--config", str(path), "--direct-min-bytes", flag]
        )
        assert resolve_config(args).cache.direct_min_bytes == expected
    assert resolve_config(build_parser().parse_args(["serve"])).cache.direct_min_bytes == (
        64 * 1024**2
    )
