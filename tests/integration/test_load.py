"""Load, bounded and on loopback: 256 concurrent clients for 60 s mixing cold and warm
manifests and blobs through a verifying, caching pullgate. Expect 0 errors, and open
file descriptors and RSS that stay bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support import counts
from tests.support.fuzzseed import SEED
from tests.support.ocilayout import PushedArtifact, push_image
from tests.support.peers import Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
CLIENTS = 256
SECONDS = float(os.environ.get("PULLGATE_LOAD_SECONDS", "60"))
ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_256_clients_for_60s_without_errors_or_leaks(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    rng = random.Random(SEED)
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    images: list[PushedArtifact] = []
    for number in range(24):
        layers = [rng.randbytes(rng.randrange(16_000, 400_000)) for _ in range(2)]
        pushed = push_image(registry.url, f"load/app{number}", "v1", layers=layers)
        digest = Digest.parse(pushed.manifest_digest)
        payload = cs.simple_signing_payload(digest, f"{REGISTRY}/load/app{number}")
        cs.push_to_registry(
            registry.url,
            pushed.repository,
            cs.signature_image(digest, [cs.sign_layer(key, payload)]),
        )
        images.append(pushed)
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, policy=policy, cache_dir=tmp_path / "cache"
    )
    fds_before, rss_before = fds(pullgate.pid), rss_kib(pullgate.pid)

    async def load() -> tuple[int, list[str], int, int]:
        requests = 0
        errors: list[str] = []
        peak_fds = peak_rss = 0
        deadline = time.monotonic() + SECONDS
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session:

            async def client(number: int) -> None:
                nonlocal requests
                local = random.Random(SEED + number)
                while time.monotonic() < deadline:
                    image = local.choice(images)
                    base = f"{pullgate.url}/v2/{image.repository}"
                    choice = local.random()
                    if choice < 0.3:
                        reference = local.choice([image.tag, image.manifest_digest])
                        url, want = f"{base}/manifests/{reference}", image.manifest_digest
                    else:
                        # The manifest must have been verified for its blobs to be allowed.
                        async with session.get(
                            f"{base}/manifests/{image.tag}?ns={REGISTRY}",
                            headers={"Accept": ACCEPT},
                        ) as response:
                            await response.read()
                        blob = local.choice(image.layer_digests)
                        url, want = f"{base}/blobs/{blob}", blob
                    try:
                        async with session.get(
                            f"{url}?ns={REGISTRY}", headers={"Accept": ACCEPT}
                        ) as response:
                            body = await response.read()
                            if response.status != 200:
                                errors.append(f"{response.status} {url}")
                            elif "sha256:" + hashlib.sha256(body).hexdigest() != want:
                                errors.append(f"wrong bytes for {url}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        errors.append(f"{type(exc).__name__} {url}")
                    requests += 1

            async def sample() -> None:
                nonlocal peak_fds, peak_rss
                while time.monotonic() < deadline:
                    peak_fds = max(peak_fds, fds(pullgate.pid))
                    peak_rss = max(peak_rss, rss_kib(pullgate.pid))
                    await asyncio.sleep(0.5)

            await asyncio.gather(sample(), *(client(n) for n in range(CLIENTS)))
        return requests, errors, peak_fds, peak_rss

    requests, errors, peak_fds, peak_rss = asyncio.run(load())
    counts.add("load clients", CLIENTS)
    counts.add("load requests", requests)
    print(
        f"load: {CLIENTS} clients, {requests} requests in {SECONDS:.0f}s, {len(errors)} errors, "
        f"fds {fds_before}->{peak_fds}, RSS {rss_before // 1024}->{peak_rss // 1024} MiB"
    )
    assert errors == [], errors[:10]
    assert requests > CLIENTS
    time.sleep(1)
    # Afterwards only the upstream keep-alive pool (64 per host) may remain open.
    assert fds(pullgate.pid) <= fds_before + 64 + 16, "file descriptors leaked"
    # Under load: per active client a socket, a dup for sendfile and the blob file, plus
    # the upstream pool. Bounded by the client count, not by the request count.
    assert peak_fds <= fds_before + 3 * CLIENTS + 64
    assert peak_rss <= rss_before + 256 * 1024, "RSS grew without bound under load"
