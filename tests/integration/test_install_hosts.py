"""``pullgate install-hosts`` and ``doctor`` against real containerd 1.6.

The node's certs.d starts with a hosts.toml that sends the registry straight to the
upstream: containerd would pull unsigned images past pullgate. doctor names that file;
install-hosts (as the DaemonSet's init container runs it: --config) backs it up and
makes pullgate the only host, after which a signed image pulls and an unsigned one is
refused with no blob of it leaving the registry; doctor is then clean, and --restore
brings the node's file back byte for byte.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.cli import hoststoml, main
from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_image
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
SEEDS = itertools.count(9100)


def write_trust(work: Path) -> tuple[Path, cs.TestKey]:
    policy_dir = work / "policy"
    key = cs.generate_key()
    key.write_public(policy_dir / "keys" / "release.pub")
    cs.TestSigstore().write_trusted_root(policy_dir / "trust" / "trusted_root.json")
    policy = policy_dir / "policy.yaml"
    policy.write_text(
        "default: deny\n"
        "trust:\n"
        "  sigstoreTrustedRoot: trust/trusted_root.json\n"
        "scopes:\n"
        f'  - match: "{REGISTRY}/**"\n'
        "    mode: enforce\n"
        "    require:\n"
        "      allOf:\n"
        "        - cosign: {key: keys/release.pub}\n"
    )
    return policy, key


def push(registry: Registry, repository: str) -> PushedArtifact:
    layers = [deterministic_bytes(32 * 1024, seed=next(SEEDS)) for _ in range(2)]
    return push_image(registry.url, repository, "v1", layers=layers)


def pull(containerd: Containerd, pushed: PushedArtifact) -> tuple[int, str]:
    done = containerd.ctr(
        "images", "pull", "--plain-http", "--hosts-dir", str(containerd.certs_dir),
        f"{REGISTRY}/{pushed.repository}:{pushed.tag}",
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_install_hosts_closes_seeded_bypass_and_restore_brings_it_back(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy, key = write_trust(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstreams:\n  {REGISTRY}: {{url: '{registry.url}'}}\n"
        f"defaultUpstream: {REGISTRY}\npolicy: {policy}\n"
    )
    pullgate = make_pullgate(upstreams={}, config=config)
    certs = containerd.certs_dir
    seeded = certs / REGISTRY / "hosts.toml"
    seeded.parent.mkdir(parents=True)
    original = (
        f"# the node's own file: straight to the registry\r\n"
        f'server = "{registry.url}"\n\n[host."{registry.url}"]\n'
        f'  capabilities = ["pull", "resolve"]\n  skip_verify = true'
    ).encode()
    seeded.write_bytes(original)
    doctor = [
        "doctor",
        "--certs-dir",
        str(certs),
        "--server",
        pullgate.url,
        "--config",
        str(config),
    ]

    # The seeded file is a real bypass: containerd pulls an unsigned image past pullgate.
    bypassed = push(registry, "app/bypassed")
    code, output = pull(containerd, bypassed)
    assert code == 0, output
    assert sum(registry.blob_gets(blob) for blob in bypassed.blobs) > 0
    assert main(doctor) == 1
    report = capsys.readouterr().out
    assert f"{seeded}: server is '{registry.url}', not pullgate" in report
    assert f"{certs / '_default' / 'hosts.toml'}: missing" in report

    install = ["install-hosts", "--certs-dir", str(certs), "--server", pullgate.url]
    assert main([*install, "--config", str(config)]) == 0
    assert main([*install, "--config", str(config)]) == 0  # the init container reruns
    assert (seeded.parent / hoststoml.BACKUP_FILE).read_bytes() == original
    capsys.readouterr()
    assert main(doctor) == 0, capsys.readouterr().out

    signed = push(registry, "app/signed")
    payload = cs.simple_signing_payload(
        Digest.parse(signed.manifest_digest), f"{REGISTRY}/app/signed"
    )
    artifact = cs.signature_image(
        Digest.parse(signed.manifest_digest), [cs.sign_layer(key, payload)]
    )
    cs.push_to_registry(registry.url, "app/signed", artifact)
    code, output = pull(containerd, signed)
    assert code == 0, output
    assert set(signed.blobs) <= containerd.content_digests()

    unsigned = push(registry, "app/unsigned")
    code, output = pull(containerd, unsigned)
    assert code != 0, f"containerd pulled an unsigned image past pullgate: {output}"
    assert unsigned.manifest_digest not in containerd.content_digests()
    assert sum(registry.blob_gets(blob) for blob in unsigned.blobs) == 0
    assert "403" in output or "denied" in output.lower(), output

    capsys.readouterr()
    assert main(["install-hosts", "--certs-dir", str(certs), "--restore"]) == 0
    out = capsys.readouterr().out
    assert f"restored {seeded}" in out
    assert seeded.read_bytes() == original
    assert sorted(p.name for p in certs.iterdir()) == [REGISTRY]
    assert sorted(p.name for p in seeded.parent.iterdir()) == ["hosts.toml"]
    assert main(doctor) == 1
