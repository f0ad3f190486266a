"""The supervisor's copies of the CA files the config names."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, TransportConfig, UpstreamConfig
from proxy.node.config_files import (
    CA_DIR,
    docker_config_or_copy,
    keep_docker_config,
    pin_ca_files,
)
from proxy.upstream.auth import load_docker_config
from tests.support.pki_sign import issue

REGISTRY = "registry.example.test"


def _config(ca: Path, transport_ca: Path | None = None) -> Config:
    transport = TransportConfig(name="peer", url="http://127.0.0.1:9", ca_file=transport_ca)
    upstream = UpstreamConfig(
        name=REGISTRY, url="https://127.0.0.1:9", ca_file=ca, transports=(transport,)
    )
    return Config(upstreams={REGISTRY: upstream}, default_upstream=REGISTRY)


def test_workers_get_checked_copies_that_outlive_the_original(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issue("upstream CA", ca=True, key_usage="ca").pem)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    pinned = pin_ca_files(_config(ca, transport_ca=ca), runtime)
    upstream = pinned.upstreams[REGISTRY]
    assert upstream.ca_file is not None and upstream.ca_file.parent == runtime / CA_DIR
    assert upstream.transports[0].ca_file == upstream.ca_file  # one copy per file
    original = ca.read_bytes()
    ca.write_text("broken since\n")
    assert upstream.ca_file.read_bytes() == original


def test_refuses_a_ca_file_that_is_no_certificate_at_start(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(issue("upstream CA", ca=True, key_usage="ca").pem)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"transport peer: caFile .* does not load"):
        pin_ca_files(_config(good, transport_ca=bad), tmp_path)


def test_refuses_a_ca_file_that_vanished_before_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="caFile"):
        pin_ca_files(_config(tmp_path / "missing.pem"), tmp_path)


def test_a_config_without_ca_files_is_unchanged(tmp_path: Path) -> None:
    config = Config()
    assert pin_ca_files(config, tmp_path) == config
    assert not (tmp_path / CA_DIR).exists()


def _docker_config(path: Path, user: str) -> Path:
    token = base64.b64encode(f"{user}:secret".encode()).decode()
    path.write_text(json.dumps({"auths": {REGISTRY: {"auth": token}}}))
    return path


def test_refuses_to_drop_node_credentials_for_a_docker_config_broken_after_start(
    tmp_path: Path,
) -> None:
    live = _docker_config(tmp_path / "config.json", "node")
    config = replace(Config(), docker_config=live)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    copy = keep_docker_config(config, runtime)
    assert copy is not None and load_docker_config(copy)[REGISTRY].username == "node"
    # Loads: the live file is used (a rotation is picked up by a worker that starts).
    _docker_config(live, "rotated")
    assert docker_config_or_copy(config, runtime) == config
    # Broken since: the copy taken at start.
    live.write_text("{")
    chosen = docker_config_or_copy(config, runtime).docker_config
    assert chosen == copy and load_docker_config(chosen)[REGISTRY].username == "node"
    live.unlink()
    assert docker_config_or_copy(config, runtime).docker_config == copy


def test_a_docker_config_broken_at_start_is_not_kept(tmp_path: Path) -> None:
    live = tmp_path / "config.json"
    live.write_text("")
    config = replace(Config(), docker_config=live)
    assert keep_docker_config(config, tmp_path) is None
    # Nothing to fall back on: the worker reads the file and logs, as one process does.
    assert docker_config_or_copy(config, tmp_path) == config
