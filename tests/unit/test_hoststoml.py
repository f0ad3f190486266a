"""hosts.toml files written by pullgate never let containerd fall back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.cli import hoststoml
from proxy.cli.hosts import run as run_install_hosts

SERVER = "http://127.0.0.1:5050"


def test_written_file_makes_pullgate_the_only_host(tmp_path: Path) -> None:
    path = hoststoml.write(tmp_path, "registry.example.test", SERVER)
    assert path == tmp_path / "registry.example.test" / "hosts.toml"
    doc = tomllib.loads(path.read_text())
    assert doc["server"] == SERVER
    assert list(doc["host"]) == [SERVER]
    hoststoml.check_no_fallback(path.read_text(), SERVER)


def test_default_catch_all_registry_is_accepted(tmp_path: Path) -> None:
    path = hoststoml.write(tmp_path, "_default", SERVER + "/")
    assert tomllib.loads(path.read_text())["server"] == SERVER


def test_refuses_hosts_toml_with_upstream_as_server() -> None:
    text = 'server = "https://registry.example.test"\n[host."http://127.0.0.1:5050"]\n'
    with pytest.raises(hoststoml.HostsTomlError, match="not pullgate"):
        hoststoml.check_no_fallback(text, SERVER)


def test_refuses_hosts_toml_with_extra_fallback_host() -> None:
    text = f'server = "{SERVER}"\n[host."https://registry.example.test"]\ncapabilities = ["pull"]\n'
    with pytest.raises(hoststoml.HostsTomlError, match="fall back"):
        hoststoml.check_no_fallback(text, SERVER)


@pytest.mark.parametrize("server", ["ftp://x", "http://127.0.0.1:5050/v2", "127.0.0.1:5050"])
def test_refuses_server_that_is_not_a_plain_http_url(tmp_path: Path, server: str) -> None:
    with pytest.raises(hoststoml.HostsTomlError):
        hoststoml.write(tmp_path, "registry.example.test", server)


@pytest.mark.parametrize("registry", ["../etc", "a/b", "", "x" * 300])
def test_refuses_registry_names_that_escape_certs_dir(tmp_path: Path, registry: str) -> None:
    with pytest.raises(hoststoml.HostsTomlError):
        hoststoml.write(tmp_path / "certs.d", registry, SERVER)
    assert not any(tmp_path.rglob("hosts.toml"))


def test_install_hosts_command_writes_every_registry(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(certs_dir=tmp_path, server=SERVER, registry=["a.test", "b.test"])
    assert run_install_hosts(args) == 0
    assert sorted(p.parent.name for p in tmp_path.glob("*/hosts.toml")) == ["a.test", "b.test"]
    bad = argparse.Namespace(certs_dir=tmp_path, server="ftp://x", registry=None)
    assert run_install_hosts(bad) == 2
