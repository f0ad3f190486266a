"""Verification latency: cosign key, keyless bundle, Notation, and a cached verdict.

Each verifier runs in-process against an in-memory registry (no network, so this is
the cost of verification itself), N times; medians in milliseconds.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.oci.manifest import parse_manifest
from proxy.pipeline.gate import RepoKey
from proxy.verify.base import Limits, Subject, TrustConfig
from proxy.verify.cosign import cosign_verifier_from_spec
from proxy.verify.notation import notation_verifier_from_spec
from proxy.verify.policy import Leaf, Policy, Scope, glob_to_regex
from proxy.verify.signature_gate import SignatureGate
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact


def _subject(image: cs.Artifact) -> Subject:
    return Subject(
        registry="registry.example.test",
        repository="bench/app",
        digest=image.digest,
        media_type=image.media_type,
        size=len(image.manifest),
    )


async def _time(verifier: Any, subject: Subject, source: Any, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await verifier.verify(subject, source, Limits())
        samples.append((time.perf_counter() - started) * 1000)
        assert result.ok, result.reason
    return samples


async def measure(runs: int = 200) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="pullgate-bench-verify-") as work:
        return await _measure(Path(work), runs)


async def _measure(work: Path, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    image = cs.image_manifest([b"bench layer"])

    # cosign key, legacy signature
    key = cs.generate_key()
    key.write_public(work / "release.pub")
    registry = cs.MemoryRegistry()
    registry.add(image)
    payload = cs.simple_signing_payload(image.digest, "registry.example.test/bench/app")
    registry.add(cs.signature_image(image.digest, [cs.sign_layer(key, payload)]))
    verifier = cosign_verifier_from_spec({"key": "release.pub"}, base_dir=work, trust=TrustConfig())
    out["cosign key (legacy)"] = await _time(verifier, _subject(image), registry, runs)

    # keyless certificate bundle through sigstore-python, offline
    sigstore = cs.TestSigstore()
    root = sigstore.write_trusted_root(work / "trusted_root.json")
    signer = cs.generate_key()
    bundle = sigstore.certificate_bundle(signer, image.digest)
    keyless = cs.MemoryRegistry()
    keyless.add(image)
    keyless.add(cs.bundle_referrer(bundle, image.descriptor))
    keyless_verifier = cosign_verifier_from_spec(
        {"keyless": {"issuer": "https://issuer.example.test", "subject": "signer@example.test"}},
        base_dir=work,
        trust=TrustConfig(sigstore_trusted_root=root),
    )
    out["cosign keyless bundle"] = await _time(keyless_verifier, _subject(image), keyless, runs)

    # Notation JWS
    notary = TestNotary()
    notary.write_trust(work / "notation")
    notation = cs.MemoryRegistry()
    notation.add(image)
    target = descriptor_of(image.manifest, image.media_type)
    notation.add(signature_artifact(notary.jws(target), "application/jose+json", target))
    notation_verifier = notation_verifier_from_spec(
        {"trustPolicy": "notation/trustpolicy.json", "trustStore": "notation/truststore"},
        base_dir=work,
    )
    out["notation JWS"] = await _time(notation_verifier, _subject(image), notation, runs)

    # cached verdict through the gate
    policy = Policy(
        default="deny",
        scopes=(
            Scope(match="**", mode="enforce", require=Leaf(verifier), _regex=glob_to_regex("**")),
        ),
        limits=Limits(),
        positive_ttl=300,
        negative_ttl=30,
        revision="bench",
        source="<bench>",
    )
    gate = SignatureGate(policy)
    manifest = parse_manifest(image.manifest, image.media_type)
    repo = RepoKey("registry.example.test", "bench/app")
    await gate.check_manifest(repo, manifest, registry)
    samples = []
    for _ in range(runs * 10):
        started = time.perf_counter()
        await gate.check_manifest(repo, manifest, registry)
        samples.append((time.perf_counter() - started) * 1000)
    out["cached verdict"] = samples
    return out


def run(runs: int = 200) -> dict[str, float]:
    results = asyncio.run(measure(runs))
    return {name: statistics.median(samples) for name, samples in results.items()}


if __name__ == "__main__":
    for name, median in run().items():
        print(f"{name:<24} {median * 1000:9.1f} µs")
