"""``pullgate doctor`` names every hosts.toml that lets containerd bypass pullgate."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import hoststoml, main
from proxy.node import supervisor

SERVER = "http://127.0.0.1:5050"
UPSTREAM = "https://registry.example.test"


def doctor(certs: Path, *extra: str) -> int:
    return main(["doctor", "--certs-dir", str(certs), "--server", SERVER, *extra])


def findings(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def clean_certs(tmp_path: Path, *registries: str) -> Path:
    certs = tmp_path / "certs.d"
    for registry in (hoststoml.DEFAULT_REGISTRY, *registries):
        hoststoml.install(certs, registry, SERVER)
    return certs


@pytest.fixture(autouse=True)
def migrating_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``tcp_migrate_req`` of 1, whatever the machine running the tests has."""
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("1\n")
    monkeypatch.setattr(supervisor, "MIGRATE_SYSCTL", sysctl)
    return sysctl


def write_config(
    tmp_path: Path, policy: str | None = "policy.yaml", url: str = UPSTREAM, workers: int = 2
) -> Path:
    config = tmp_path / "config.yaml"
    text = f"workers: {workers}\nupstreams:\n  registry.example.test: {{url: '{url}'}}\n"
    text += "defaultUpstream: registry.example.test\n"
    if policy is not None:
        text += f"policy: {policy}\n"
    config.write_text(text)
    return config


def test_checks_files_pullgate_wrote_are_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    (tmp_path / "policy.yaml").write_text("default: deny\n")
    assert doctor(certs, "--config", str(write_config(tmp_path))) == 0
    assert "no fallback" in capsys.readouterr().out


def test_refuses_upstream_as_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = clean_certs(tmp_path)
    path = certs / "registry.example.test" / "hosts.toml"
    path.parent.mkdir()
    path.write_text(f'server = "{UPSTREAM}"\n[host."{SERVER}"]\n  capabilities = ["pull"]\n')
    assert doctor(certs) == 1
    assert findings(capsys) == [f"{path}: server is '{UPSTREAM}', not pullgate at '{SERVER}'"]


def test_refuses_mirror_host_listed_besides_pullgate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = clean_certs(tmp_path)
    path = certs / "_default" / "hosts.toml"
    path.write_text(
        f'server = "{SERVER}"\n[host."https://mirror.example.test"]\n  capabilities = ["pull"]\n'
        f'[host."{SERVER}"]\n  capabilities = ["pull"]\n'
    )
    assert doctor(certs) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{path}: ") and "https://mirror.example.test" in line


def test_refuses_missing_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = tmp_path / "certs.d"
    hoststoml.install(certs, "registry.example.test", SERVER)
    assert doctor(certs) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{certs / '_default' / 'hosts.toml'}: missing")


def test_refuses_directory_without_hosts_toml_that_shadows_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = clean_certs(tmp_path)
    (certs / "registry.example.test").mkdir()
    (certs / "registry.example.test" / "ca.crt").write_text("certificate only")
    assert doctor(certs) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{certs / 'registry.example.test' / 'hosts.toml'}: no hosts.toml")


def test_checks_configured_registry_without_file_is_fine_only_through_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policy.yaml").write_text("default: deny\n")
    config = write_config(tmp_path)
    certs = clean_certs(tmp_path)
    assert doctor(certs, "--config", str(config)) == 0
    capsys.readouterr()
    (certs / "_default" / "hosts.toml").write_text(f'server = "{UPSTREAM}"\n')
    assert doctor(certs, "--config", str(config)) == 1
    lines = findings(capsys)
    assert len(lines) == 2
    assert "configured registry registry.example.test" in lines[1]


def test_refuses_unreadable_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n  - match: 'registry.example.test/**'\n    mode: enforce\n"
        "    require:\n      allOf:\n        - cosign: {key: keys/missing.pub}\n"
    )
    assert doctor(certs, "--config", str(write_config(tmp_path))) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{policy}: policy does not load") and "keys/missing.pub" in line


def test_refuses_missing_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    assert doctor(certs, "--config", str(write_config(tmp_path, policy="absent.yaml"))) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{tmp_path / 'absent.yaml'}: policy does not load")


def test_refuses_config_without_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    config = write_config(tmp_path, policy=None)
    assert doctor(certs, "--config", str(config)) == 1
    assert findings(capsys) == [
        f"{config}: no policy: pullgate lets every image through unverified"
    ]


def test_refuses_upstream_url_with_bad_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    (tmp_path / "policy.yaml").write_text("default: deny\n")
    config = write_config(tmp_path, url="https://registry.example.test:99999")
    assert doctor(certs, "--config", str(config)) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{config}: upstream registry.example.test: url")


def test_refuses_config_that_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = clean_certs(tmp_path)
    config = write_config(tmp_path, url="ftp://registry.example.test")
    assert doctor(certs, "--config", str(config)) == 1
    (line,) = findings(capsys)
    assert line.startswith(f"{config}: config does not load")


def test_refuses_missing_certs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor(tmp_path / "absent") == 1
    assert findings(capsys)[0].startswith(f"{tmp_path / 'absent'}: no such directory")


@pytest.mark.parametrize("server", ["ftp://x", "127.0.0.1:5050", "http://127.0.0.1:5050/v2"])
def test_refuses_bad_server_argument_with_exit_2(tmp_path: Path, server: str) -> None:
    assert main(["doctor", "--certs-dir", str(tmp_path), "--server", server]) == 2


def test_refuses_missing_certs_dir_argument_with_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor"])
    assert exc.value.code == 2


def test_refuses_workers_whose_queued_connections_a_dying_worker_would_reset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], migrating_kernel: Path
) -> None:
    certs = clean_certs(tmp_path, "registry.example.test")
    (tmp_path / "policy.yaml").write_text("default: deny\n")
    migrating_kernel.write_text("0\n")
    assert doctor(certs, "--config", str(write_config(tmp_path))) == 1
    [finding] = findings(capsys)
    assert str(migrating_kernel) in finding and "tcp_migrate_req is 0" in finding
    # One worker has no siblings to hand connections to: nothing to report.
    assert doctor(certs, "--config", str(write_config(tmp_path, workers=1))) == 0
    assert "no fallback" in capsys.readouterr().out
    # A kernel without the setting (before Linux 5.14) is named as such.
    migrating_kernel.unlink()
    assert doctor(certs, "--config", str(write_config(tmp_path))) == 1
    assert "Linux 5.14" in findings(capsys)[0]
