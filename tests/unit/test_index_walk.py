"""The one index walk prefetch and ``pullgate verify`` share: order, cap, outcomes."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable, VerificationFailed
from proxy.oci.manifest import Manifest, parse_manifest
from proxy.oci.reference import ManifestRef
from proxy.pipeline import ServedManifest
from proxy.pipeline.gate import Verdict
from proxy.pipeline.walk import MAX_INDEX_CHILDREN, IndexWalk, is_attestation
from proxy.upstream.router import Route
from tests.unit.verify.manifests import OCI_INDEX, image, index

ROUTE = cast(Route, object())  # the walk only hands it to the pipeline


class FakePipeline:
    """``get_manifest`` by digest: serves ``manifests``, raises what ``errors`` says."""

    def __init__(self, manifests: list[Manifest], errors: dict[Digest, Exception]) -> None:
        self.manifests = {m.digest: m for m in manifests}
        self.errors = errors
        self.asked: list[tuple[str, ManifestRef]] = []

    async def get_manifest(
        self, route: Route, repository: str, ref: ManifestRef, *, accept: str | None = None
    ) -> ServedManifest:
        assert route is ROUTE
        self.asked.append((repository, ref))
        assert ref.digest is not None and ref.tag is None, "children are asked for by digest"
        if ref.digest in self.errors:
            raise self.errors[ref.digest]
        return ServedManifest(self.manifests[ref.digest], Verdict(allowed=True, reason="ok"))


def _index_of(children: list[dict[str, Any]]) -> Manifest:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    return parse_manifest(json.dumps(doc).encode(), OCI_INDEX)


async def test_walks_every_child_in_index_order_by_digest() -> None:
    children = [image(f"layer {i}".encode()) for i in range(3)]
    pipeline = FakePipeline(children, {})
    walk = IndexWalk(pipeline, ROUTE, "team/app", index(*children))
    outcomes = [outcome async for outcome in walk]
    assert [o.descriptor.digest for o in outcomes] == [c.digest for c in children]
    assert [o.result().manifest for o in outcomes] == children
    assert [ref.digest for _, ref in pipeline.asked] == [c.digest for c in children]
    assert {repo for repo, _ in pipeline.asked} == {"team/app"}
    assert walk.not_checked == 0


async def test_caps_the_children_and_counts_the_rest_before_fetching_any() -> None:
    children = [image(f"layer {i}".encode()) for i in range(MAX_INDEX_CHILDREN + 5)]
    pipeline = FakePipeline(children, {})
    walk = IndexWalk(pipeline, ROUTE, "r", index(*children))
    assert walk.not_checked == 5 and len(walk.checked) == MAX_INDEX_CHILDREN
    assert pipeline.asked == [], "counting does not fetch"
    outcomes = [outcome async for outcome in walk]
    assert len(outcomes) == len(pipeline.asked) == MAX_INDEX_CHILDREN
    assert [o.descriptor.digest for o in outcomes] == [
        c.digest for c in children[:MAX_INDEX_CHILDREN]
    ]

    small = IndexWalk(FakePipeline(children, {}), ROUTE, "r", index(*children), max_children=2)
    assert small.not_checked == len(children) - 2
    assert len([o async for o in small]) == 2


async def test_a_child_error_is_its_outcome_and_the_walk_goes_on() -> None:
    refused, unreachable, fine = (image(f"layer {i}".encode()) for i in range(3))
    denial = VerificationFailed("unsigned")
    outage = UpstreamUnavailable("registry down")
    pipeline = FakePipeline(
        [refused, unreachable, fine], {refused.digest: denial, unreachable.digest: outage}
    )
    outcomes = [o async for o in IndexWalk(pipeline, ROUTE, "r", index(refused, unreachable, fine))]
    assert [(o.error, o.served is None) for o in outcomes[:2]] == [(denial, True), (outage, True)]
    with pytest.raises(VerificationFailed):
        outcomes[0].result()
    with pytest.raises(UpstreamUnavailable):
        outcomes[1].result()
    assert outcomes[2].error is None and outcomes[2].result().manifest == fine


async def test_a_bug_is_not_a_child_outcome() -> None:
    child = image(b"layer")
    pipeline = FakePipeline([child], {child.digest: KeyError("bug")})
    with pytest.raises(KeyError):
        [o async for o in IndexWalk(pipeline, ROUTE, "r", index(child))]


async def test_an_image_manifest_has_no_children() -> None:
    pipeline = FakePipeline([], {})
    walk = IndexWalk(pipeline, ROUTE, "r", image())
    assert walk.not_checked == 0 and walk.checked == ()
    assert [o async for o in walk] == []


def test_recognises_buildx_attestation_entries() -> None:
    child = image()
    base = {"mediaType": child.media_type, "digest": str(child.digest), "size": len(child.raw)}
    annotated = {
        **base,
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    unknown = {**base, "platform": {"os": "unknown", "architecture": "unknown"}}
    linux = {**base, "platform": {"os": "linux", "architecture": "amd64"}}
    other_type = {**base, "annotations": {"vnd.docker.reference.type": "something-else"}}
    descriptors = _index_of([annotated, unknown, linux, other_type, base]).manifests
    assert [is_attestation(d) for d in descriptors] == [True, True, False, False, False]
