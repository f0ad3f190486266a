"""hosts.toml files written by pullgate never let containerd fall back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.cli import hoststoml, main

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


def test_install_hosts_command_writes_default_and_every_registry(tmp_path: Path) -> None:
    argv = ["install-hosts", "--certs-dir", str(tmp_path), "--server", SERVER]
    assert main([*argv, "--registry", "a.test", "--registry", "b.test"]) == 0
    written = sorted(p.parent.name for p in tmp_path.glob("*/hosts.toml"))
    assert written == ["_default", "a.test", "b.test"]
    assert main(["install-hosts", "--certs-dir", str(tmp_path), "--server", "ftp://x"]) == 2


def test_install_hosts_writes_every_configured_upstream(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstreams:\n"
        "  registry.example.test: {url: 'http://127.0.0.1:5000'}\n"
        "  other.example.test: {url: 'https://other.example.test'}\n"
        "defaultUpstream: registry.example.test\n"
    )
    certs = tmp_path / "certs.d"
    argv = ["install-hosts", "--certs-dir", str(certs), "--config", str(config)]
    assert main([*argv, "--server", SERVER, "--registry", "extra.test"]) == 0
    written = sorted(p.parent.name for p in certs.glob("*/hosts.toml"))
    assert written == ["_default", "extra.test", "other.example.test", "registry.example.test"]
    for path in certs.glob("*/hosts.toml"):
        hoststoml.check_no_fallback(path.read_text(), SERVER)


def test_install_hosts_refuses_a_config_that_does_not_load(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  registry.example.test: {url: 'ftp://x'}\n")
    certs = tmp_path / "certs.d"
    assert main(["install-hosts", "--certs-dir", str(certs), "--config", str(config)]) == 2
    assert not certs.exists()


ODD = b'# someone else\'s\r\nserver = "https://registry.example.test"\n\x00\xff no newline'


def seed(certs: Path, registry: str, data: bytes, mode: int = 0o640) -> Path:
    path = certs / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_backs_up_a_foreign_hosts_toml_once(tmp_path: Path) -> None:
    target = seed(tmp_path, "registry.example.test", ODD)
    hoststoml.install(tmp_path, "registry.example.test", SERVER)
    backup = target.with_name(hoststoml.BACKUP_FILE)
    assert backup.read_bytes() == ODD
    hoststoml.check_no_fallback(target.read_text(), SERVER)
    # A rerun (another server even) sees pullgate's own file: the backup stays the original.
    lines = hoststoml.install(tmp_path, "registry.example.test", "http://127.0.0.1:6060")
    assert backup.read_bytes() == ODD
    assert not any("backed up" in line for line in lines)
    hoststoml.check_no_fallback(target.read_text(), "http://127.0.0.1:6060")


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    seed(tmp_path, "registry.example.test", ODD)
    argv = ["install-hosts", "--certs-dir", str(tmp_path), "--registry", "registry.example.test"]
    assert main(argv) == 0
    first = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert main(argv) == 0
    second = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "registry.example.test").iterdir()) == [
        "hosts.toml",
        hoststoml.BACKUP_FILE,
    ]


def test_refuses_to_overwrite_backup_when_file_changes_after_install(tmp_path: Path) -> None:
    target = seed(tmp_path, "registry.example.test", ODD)
    hoststoml.install(tmp_path, "registry.example.test", SERVER)
    target.write_bytes(b'server = "https://elsewhere.example.test"\n')
    lines = hoststoml.install(tmp_path, "registry.example.test", SERVER)
    assert any("keeps the original" in line for line in lines)
    assert target.with_name(hoststoml.BACKUP_FILE).read_bytes() == ODD
    hoststoml.check_no_fallback(target.read_text(), SERVER)


def test_restore_brings_back_files_byte_for_byte_and_removes_what_pullgate_added(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs.d"
    odd = seed(certs, "registry.example.test", ODD, mode=0o600)
    stat_before = odd.stat()
    (certs / "had.dir.test").mkdir()
    (certs / "had.dir.test" / "ca.crt").write_bytes(b"not pullgate's")
    untouched = seed(certs, "untouched.test", b"left alone")
    argv = ["install-hosts", "--certs-dir", str(certs), "--server", SERVER]
    for registry in ("registry.example.test", "had.dir.test", "new.example.test"):
        argv += ["--registry", registry]
    assert main(argv) == 0
    assert main(argv) == 0
    assert (certs / "new.example.test" / "hosts.toml").is_file()
    capsys.readouterr()

    assert main(["install-hosts", "--certs-dir", str(certs), "--restore"]) == 0
    out = capsys.readouterr().out
    assert odd.read_bytes() == ODD
    assert (odd.stat().st_mode, odd.stat().st_ino) == (stat_before.st_mode, stat_before.st_ino)
    assert not (certs / "new.example.test").exists()
    assert not (certs / "_default").exists()
    assert sorted(p.name for p in (certs / "had.dir.test").iterdir()) == ["ca.crt"]
    assert untouched.read_bytes() == b"left alone"
    assert not list(certs.rglob("*pullgate*"))
    assert f"restored {odd}" in out
    assert f"removed {certs / 'new.example.test'}" in out
    assert f"removed {certs / 'had.dir.test' / 'hosts.toml'}" in out
    # Restoring again finds nothing of pullgate's and changes nothing.
    assert main(["install-hosts", "--certs-dir", str(certs), "--restore"]) == 0
    assert odd.read_bytes() == ODD
    assert "nothing to restore" in capsys.readouterr().out


def test_restore_keeps_a_created_directory_that_is_no_longer_empty(tmp_path: Path) -> None:
    hoststoml.install(tmp_path, "new.example.test", SERVER)
    (tmp_path / "new.example.test" / "ca.crt").write_bytes(b"added later")
    lines = hoststoml.restore(tmp_path)
    assert any(line.startswith("kept") for line in lines)
    assert sorted(p.name for p in (tmp_path / "new.example.test").iterdir()) == ["ca.crt"]
