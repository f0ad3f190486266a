"""Prefetch warms the cache through the same verification, for GPU nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import deterministic_bytes, push_model
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
