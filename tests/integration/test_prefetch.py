"""Prefetch warms the cache through the same verification, for GPU nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import (
    PushedArtifact,
    deterministic_bytes,
    push_image,
    push_manifest,
    push_model,
)
from tests.support.peers import ROOT, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"


def test_prefetch_warms_verified_models_and_refuses_unsigned(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    signed = push_model(
        registry.url, "models/llm", "v1", files={"w.bin": deterministic_bytes(3 << 20, 101)}
    )
    digest = Digest.parse(signed.manifest_digest)
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/models/llm")
    cs.push_to_registry(
        registry.url, "models/llm", cs.signature_image(digest, [cs.sign_layer(key, payload)])
    )
    unsigned = push_model(
        registry.url, "models/llm", "unsigned", files={"w.bin": deterministic_bytes(2 << 20, 102)}
    )
    cache = tmp_path / "cache"
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy, cache_dir=cache)

    # 1. The admin endpoint streams NDJSON progress.
    request = urllib.request.Request(
        f"{pullgate.admin_url}/admin/prefetch",
        data=json.dumps({"references": [f"{REGISTRY}/models/llm:v1"]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    assert events, "no progress reported"
    stored = {p.name for p in (cache / "blobs" / "sha256").iterdir()}
    assert all(d.split(":", 1)[1] in stored for d in signed.layer_digests)

    # 2. The CLI: success for the signed model, non-zero with the reason for the unsigned.
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "prefetch", f"{REGISTRY}/models/llm:v1",
         "--admin", pullgate.admin_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "proxy", "prefetch", f"{REGISTRY}/models/llm:unsigned",
         "--admin", pullgate.admin_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "DENIED" in refused.stdout + refused.stderr
    assert all(registry.blob_gets(b) == 0 for b in unsigned.layer_digests)


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _prefetch(pullgate: Pullgate, reference: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{pullgate.admin_url}/admin/prefetch",
        data=json.dumps({"references": [reference]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_prefetch_walks_index_children_as_verify_does(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    """An unsigned buildx attestation is skipped (no pull depends on it); an unsigned
    platform fails the prefetch, as it fails ``pullgate verify`` and the pull."""
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    indexes: eachChild\n"
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    repo = "multi/app"

    def sign(digest_text: str) -> None:
        digest = Digest.parse(digest_text)
        payload = cs.simple_signing_payload(digest, f"{REGISTRY}/{repo}")
        cs.push_to_registry(
            registry.url, repo, cs.signature_image(digest, [cs.sign_layer(key, payload)])
        )

    def child(pushed: PushedArtifact, os_arch: str, **extra: object) -> dict[str, object]:
        os_name, arch = os_arch.split("/")
        return {
            "mediaType": OCI_MANIFEST,
            "digest": pushed.manifest_digest,
            "size": len(pushed.manifest_bytes),
            "platform": {"os": os_name, "architecture": arch},
            **extra,
        }

    def push_index(tag: str, children: list[dict[str, object]]) -> str:
        raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
        digest = push_manifest(registry.url, repo, tag, raw.encode(), OCI_INDEX)
        sign(digest)
        return digest

    amd64 = push_image(registry.url, repo, "amd64", layers=[deterministic_bytes(900, 91)])
    arm64 = push_image(registry.url, repo, "arm64", layers=[deterministic_bytes(900, 92)])
    attestation = push_image(registry.url, repo, "att", layers=[deterministic_bytes(300, 93)])
    sign(amd64.manifest_digest)  # arm64 and the attestation stay unsigned
    marker = {"vnd.docker.reference.type": "attestation-manifest"}
    push_index(
        "with-attestation",
        [child(amd64, "linux/amd64"), child(attestation, "unknown/unknown", annotations=marker)],
    )
    push_index("two-platforms", [child(amd64, "linux/amd64"), child(arm64, "linux/arm64")])
    cache = tmp_path / "cache"
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy, cache_dir=cache)

    events = _prefetch(pullgate, f"{REGISTRY}/{repo}:with-attestation")
    kinds = [e["kind"] for e in events]
    assert "error" not in kinds and events[-1] == {
        "kind": "summary", "ok": True, "references": 1
    }, events  # fmt: skip
    skipped = [e for e in events if e["kind"] == "skipped"]
    assert [e["digest"] for e in skipped] == [attestation.manifest_digest]
    assert "cosign key keys/release.pub" in skipped[0]["message"]  # why it was refused
    stored = {p.name for p in (cache / "blobs" / "sha256").iterdir()}
    assert all(d.split(":", 1)[1] in stored for d in amd64.layer_digests)
    assert all(registry.blob_gets(d) == 0 for d in attestation.layer_digests)

    refused = _prefetch(pullgate, f"{REGISTRY}/{repo}:two-platforms")
    errors = [e for e in refused if e["kind"] == "error"]
    assert errors and "DENIED" in errors[0]["message"], refused
    assert refused[-1]["ok"] is False
    assert all(registry.blob_gets(d) == 0 for d in arm64.layer_digests)
