"""A registry that cannot answer is no verdict, in every verifier.

Each verifier fetches signature material (a simple-signing payload, a bundle, an
envelope, a signature manifest). When that fetch fails because the registry is slow,
throttles, breaks off or answers 5xx, the verifier must let the error propagate: the
gate then answers 5xx and caches nothing. Turned into a failing reason instead, it
would be cached as a refusal (for the negative TTL) of a correctly signed image.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError, TooManyRequests, UpstreamError, UpstreamTimeout
from proxy.oci.manifest import Manifest
from proxy.verify.base import CheckResult, Limits, Subject, TrustConfig
from proxy.verify.cosign import cosign_verifier_from_spec
from proxy.verify.notation import JWS, notation_verifier_from_spec
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact
from tests.unit.verify.test_oms import FILES
from tests.unit.verify.test_oms import setup as oms_setup

ERRORS = [
    UpstreamTimeout("the registry did not answer in time"),
    UpstreamError("upstream answered 503"),
    TooManyRequests("slow down"),
]


@dataclass
class Outage:
    """A registry whose signature material fails with ``error`` (blobs, and manifests
    other than the subject's when ``manifests`` is set); the rest is ``inner``'s."""

    inner: cs.MemoryRegistry
    subject: Digest
    error: OCIError | None = None
    manifests: bool = False

    async def manifest(self, reference: str, *, max_bytes: int) -> Manifest | None:
        if self.error is not None and self.manifests and reference != str(self.subject):
            raise self.error
        return await self.inner.manifest(reference, max_bytes=max_bytes)

    async def blob(self, digest: Digest, *, max_bytes: int) -> bytes:
        if self.error is not None:
            raise self.error
        return await self.inner.blob(digest, max_bytes=max_bytes)

    async def referrers(self, digest: Digest, artifact_type: str | None = None) -> Manifest | None:
        return await self.inner.referrers(digest, artifact_type)

    def expect_layer_files(self, digest: Digest, plan: Any) -> None:
        self.inner.expect_layer_files(digest, plan)


Case = tuple[Outage, Callable[[Outage], Awaitable[CheckResult]]]


def _subject(artifact: cs.Artifact) -> Subject:
    return Subject(
        "registry.test", "app", artifact.digest, artifact.media_type, len(artifact.manifest)
    )


def _cosign_key_case(tmp_path: Path, *, bundle: bool) -> Case:
    key = cs.generate_key()
    key.write_public(tmp_path / "keys" / "release.pub")
    image = cs.image_manifest([b"a signed layer"])
    registry = cs.MemoryRegistry()
    registry.add(image)
    if bundle:
        signed = cs.message_signature_bundle(key, image.digest, manifest=image.manifest)
        registry.add(cs.bundle_referrer(signed, image.descriptor))
    else:
        layer = cs.sign_layer(key, cs.simple_signing_payload(image.digest))
        registry.add(cs.signature_image(image.digest, [layer]))
    verifier = cosign_verifier_from_spec(
        {"key": "keys/release.pub"}, base_dir=tmp_path, trust=TrustConfig()
    )
    source = Outage(registry, image.digest)
    return source, lambda s: verifier.verify(_subject(image), s, Limits())


def _notation_case(tmp_path: Path) -> Case:
    notary = TestNotary()
    image = cs.image_manifest([b"a notation-signed layer"])
    target = descriptor_of(image.manifest, image.media_type)
    registry = cs.MemoryRegistry()
    registry.add(image)
    registry.add(signature_artifact(notary.jws(target), JWS, target))
    notary.write_trust(tmp_path)
    verifier = notation_verifier_from_spec(
        {"trustPolicy": "trustpolicy.json", "trustStore": "truststore"}, base_dir=tmp_path
    )
    source = Outage(registry, image.digest)
    return source, lambda s: verifier.verify(_subject(image), s, Limits())


def _oms_case(tmp_path: Path) -> Case:
    registry, verifier, subject = oms_setup(tmp_path, FILES, FILES)
    source = Outage(registry, subject.digest)
    return source, lambda s: verifier.verify(subject, s, Limits())


CASES: dict[str, Callable[[Path], Case]] = {
    "cosign-legacy": lambda p: _cosign_key_case(p, bundle=False),
    "cosign-bundle": lambda p: _cosign_key_case(p, bundle=True),
    "notation": _notation_case,
    "modelSigning": _oms_case,
}


@pytest.mark.parametrize("fetch", ["blob", "signature manifest"])
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("verifier", list(CASES))
async def test_refuses_to_turn_a_registry_outage_into_a_refusal(
    tmp_path: Path, verifier: str, error: OCIError, fetch: str
) -> None:
    source, verify = CASES[verifier](tmp_path)
    assert (result := await verify(source)).ok, result.reason  # signed: served when up
    source.error, source.manifests = error, fetch == "signature manifest"
    with pytest.raises(type(error)):
        result = await verify(source)
        pytest.fail(f"the outage became a verdict: {result}")
