"""What the manifest path keeps in memory stays bounded in bytes, not only in count:
an upstream (or a pod naming one with ``ns=``) that serves many distinct manifests
near the 4 MiB cap must not make the mirror hold gigabytes of them."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.oci.digest import Digest
from proxy.pipeline import manifests as manifests_module
from tests.support.inprocess import (
    ALLOW_APP_POLICY,
    OCI_CONFIG,
    OCI_MANIFEST,
    FakeRegistry,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)

MIB = 1024 * 1024


def _big_manifest(upstream: FakeRegistry, n: int) -> Digest:
    config = b"{}"
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(Digest.of(config)), "size": 2},
        "layers": [],
        "annotations": {"org.example.pad": f"{n:08d}" + "x" * MIB},
    }
    raw = json.dumps(doc).encode()
    return upstream.add_manifest("app/big", raw, OCI_MANIFEST, tag=f"v{n}")


async def test_refuses_to_keep_more_manifest_bytes_in_memory_than_its_budget(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_APP_POLICY)
    upstream = FakeRegistry()
    count = manifests_module.VERIFIED_MANIFEST_BYTES // MIB + 8
    digests = [_big_manifest(upstream, n) for n in range(count)]
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy)) as mirror,
    ):
        for n, digest in enumerate(digests):
            response = await mirror.client.get(f"/v2/app/big/manifests/v{n}")
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == str(digest)
            await response.read()
        remembered = mirror.pipeline.manifest_path._verified.values()
        held = sum(len(served.manifest.raw) for served in remembered)
        assert held <= manifests_module.VERIFIED_MANIFEST_BYTES
        # The most recent ones are still remembered (and served by digest).
        last = digests[-1]
        assert any(served.manifest.digest == last for served in remembered)
        response = await mirror.client.get(f"/v2/app/big/manifests/{last}")
        assert response.status == 200
