"""``pullgate verify`` explains a verdict the way a refused pull gets it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import (
    PushedArtifact,
    deterministic_bytes,
    push_image,
    push_manifest,
)
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
    _sign(registry, "app", key, signed.manifest_digest)
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


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _sign(registry: Registry, repo: str, key: cs.TestKey, digest_text: str) -> None:
    digest = Digest.parse(digest_text)
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/{repo}")
    cs.push_to_registry(
        registry.url, repo, cs.signature_image(digest, [cs.sign_layer(key, payload)])
    )


def _child(pushed: PushedArtifact, platform: dict[str, str], **extra: object) -> dict[str, object]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": pushed.manifest_digest,
        "size": len(pushed.manifest_bytes),
        "platform": platform,
        **extra,
    }


def test_verify_refuses_an_index_with_an_unsigned_platform_but_not_for_its_attestation(
    tmp_path: Path, registry: Registry
) -> None:
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/multi/**"\n'
        "    indexes: eachChild\n"
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    repo = "multi/app"
    amd64 = push_image(registry.url, repo, "amd64", layers=[deterministic_bytes(900, 81)])
    arm64 = push_image(registry.url, repo, "arm64", layers=[deterministic_bytes(900, 82)])
    attestation = push_image(registry.url, repo, "att", layers=[deterministic_bytes(300, 83)])
    _sign(registry, repo, key, amd64.manifest_digest)  # arm64 and the attestation: unsigned

    def push_index(tag: str, children: list[dict[str, object]]) -> None:
        raw = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        ).encode()
        digest = push_manifest(registry.url, repo, tag, raw, OCI_INDEX)
        _sign(registry, repo, key, digest)  # the index itself verifies

    linux_amd64 = {"os": "linux", "architecture": "amd64"}
    buildx_attestation = _child(
        attestation,
        {"os": "unknown", "architecture": "unknown"},
        annotations={
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": amd64.manifest_digest,
        },
    )
    push_index("with-attestation", [_child(amd64, linux_amd64), buildx_attestation])
    push_index(
        "two-platforms",
        [_child(amd64, linux_amd64), _child(arm64, {"os": "linux", "architecture": "arm64"})],
    )
    common = ["--policy", str(policy), "--upstream", f"{REGISTRY}={registry.url}"]

    allowed = verify(f"{REGISTRY}/{repo}:with-attestation", *common)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"child {amd64.manifest_digest} (linux/amd64): ALLOWED" in allowed.stdout
    assert f"child {attestation.manifest_digest} (unknown/unknown): REFUSED (attestation" in (
        allowed.stdout
    )

    refused = verify(f"{REGISTRY}/{repo}:two-platforms", *common)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"child {arm64.manifest_digest} (linux/arm64): REFUSED" in refused.stdout
    assert "1 of 2 platform manifests" in refused.stdout
