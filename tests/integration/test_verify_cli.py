"""``pullgate verify`` explains a verdict the way a refused pull gets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import deterministic_bytes, push_image
from tests.support.peers import ROOT, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "verify", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_command_allows_signed_and_explains_refusal(
    tmp_path: Path, registry: Registry
) -> None:
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    signed = push_image(registry.url, "app", "signed", layers=[deterministic_bytes(1000, 71)])
    digest = Digest.parse(signed.manifest_digest)
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/app")
    cs.push_to_registry(
        registry.url, "app", cs.signature_image(digest, [cs.sign_layer(key, payload)])
    )
    push_image(registry.url, "app", "unsigned", layers=[deterministic_bytes(1000, 72)])
    common = ["--policy", str(policy), "--upstream", f"{REGISTRY}={registry.url}"]

    allowed = verify(f"{REGISTRY}/app:signed", *common)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"ALLOWED {REGISTRY}/app@{signed.manifest_digest}" in allowed.stdout

    refused = verify(f"{REGISTRY}/app:unsigned", *common)
    assert refused.returncode == 1
    assert "REFUSED" in refused.stdout and "DENIED" in refused.stdout
    assert 'scope "registry.example.test/**"' in refused.stdout
    assert "cosign key keys/release.pub" in refused.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text("scopes:\n  - match: x\n    require: {anyOf: []}\n")
    bad = verify(f"{REGISTRY}/app:signed", "--policy", str(broken))
    assert bad.returncode == 2 and "empty" in bad.stderr
