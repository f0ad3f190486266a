"""Required referrers found through an upstream's OCI referrers API (docker-registry has
none, so the integration tests cover the tag fallback): the pipeline asks the API with
the ``artifactType`` filter and does not fall back to the tag when the API answers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.errors import Denied
from proxy.oci.manifest import Descriptor
from proxy.oci.reference import ManifestRef
from tests.support import cosign_sign as cs
from tests.support.inprocess import (
    OCI_MANIFEST,
    REGISTRY,
    FakeRegistry,
    Image,
    Mirror,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)

SPDX = "application/spdx+json"
REPOSITORY = "models/llm"
POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/models/**"
    require:
      referrers:
        - artifactType: application/spdx+json
          signedBy: {cosign: {key: keys/sbom.pub}}
"""


@pytest.fixture
def key() -> cs.TestKey:
    return cs.generate_key()


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry(referrers_api=True)


@pytest.fixture
def model(upstream: FakeRegistry) -> Image:
    return upstream.add_image(REPOSITORY, "v1", b"weights of a small model")


@pytest.fixture
async def mirror(
    upstream: FakeRegistry, model: Image, key: cs.TestKey, tmp_path: Path
) -> AsyncIterator[Mirror]:
    key.write_public(tmp_path / "keys" / "sbom.pub")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy)) as running,
    ):
        yield running


def attach_sbom(upstream: FakeRegistry, model: Image, *, artifact_type: str = SPDX) -> Digest:
    subject = Descriptor(OCI_MANIFEST, model.digest, len(model.manifest))
    sbom = cs.document_referrer(cs.spdx_document("llm"), subject, artifact_type)
    for blob in sbom.blobs:
        upstream.blobs[Digest.of(blob)] = blob
    return upstream.add_manifest(REPOSITORY, sbom.manifest, sbom.media_type)


def sign(upstream: FakeRegistry, key: cs.TestKey, digest: Digest) -> None:
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/{REPOSITORY}")
    signature = cs.signature_image(digest, [cs.sign_layer(key, payload)])
    for blob in signature.blobs:
        upstream.blobs[Digest.of(blob)] = blob
    assert signature.tag is not None
    upstream.add_manifest(REPOSITORY, signature.manifest, signature.media_type, signature.tag)


def referrer_queries(upstream: FakeRegistry) -> list[dict[str, str]]:
    return [seen.query for seen in upstream.requests_for("referrers")]


async def test_serves_model_whose_signed_sbom_the_referrers_api_lists(
    mirror: Mirror, upstream: FakeRegistry, model: Image, key: cs.TestKey
) -> None:
    sbom = attach_sbom(upstream, model)
    sign(upstream, key, sbom)
    served = await mirror.pipeline.get_manifest(mirror.route(), REPOSITORY, ManifestRef(tag="v1"))
    assert served.verdict.allowed, served.verdict.reason
    assert {"artifactType": SPDX} in referrer_queries(upstream)
    fallback_tag = f"/manifests/{model.digest.fallback_tag}"
    assert not [s for s in upstream.seen if s.path.endswith(fallback_tag)]


async def test_refuses_model_whose_referrers_api_lists_no_sbom_of_the_required_type(
    mirror: Mirror, upstream: FakeRegistry, model: Image, key: cs.TestKey
) -> None:
    sign(upstream, key, attach_sbom(upstream, model, artifact_type="application/vnd.other+json"))
    with pytest.raises(Denied, match=re.escape(f"required referrer {SPDX} is missing")):
        await mirror.pipeline.get_manifest(mirror.route(), REPOSITORY, ManifestRef(tag="v1"))
    assert {"artifactType": SPDX} in referrer_queries(upstream)


async def test_refuses_model_whose_unfiltering_referrers_api_lists_only_other_types(
    mirror: Mirror, upstream: FakeRegistry, model: Image, key: cs.TestKey
) -> None:
    """The spec lets a registry ignore ``artifactType``: what it lists of other types
    never counts."""
    upstream.referrers_filter = False
    other = attach_sbom(upstream, model, artifact_type="application/vnd.other+json")
    sign(upstream, key, other)
    with pytest.raises(Denied, match=re.escape(f"required referrer {SPDX} is missing")):
        await mirror.pipeline.get_manifest(mirror.route(), REPOSITORY, ManifestRef(tag="v1"))
    assert {"artifactType": SPDX} in referrer_queries(upstream)
