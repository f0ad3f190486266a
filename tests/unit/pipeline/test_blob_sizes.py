"""The sizes served manifests give their blobs: what bounds an uncached upstream body
(``BlobAllowances.expected_sizes``), per repository, shared by sibling workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest, parse_manifest
from proxy.pipeline.allowances import BlobAllowances
from proxy.pipeline.gate import AllowAllGate, RepoKey
from proxy.pipeline.shared import SharedAllowances
from proxy.upstream.client import UpstreamClient
from proxy.upstream.router import Route

REGISTRY = "registry.example.test"
REPO = RepoKey(REGISTRY, "team/app")
LAYER = Digest.of(b"layer")
CONFIG = Digest.of(b"config")


def manifest(layer_size: int, config_size: int = 6) -> Manifest:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(CONFIG),
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": str(LAYER),
                "size": layer_size,
            }
        ],
    }
    return parse_manifest(json.dumps(doc).encode(), "application/vnd.oci.image.manifest.v1+json")


def route(registry: str = REGISTRY) -> Route:
    return Route(registry, cast(UpstreamClient, None), True)


def allowances(shared: SharedAllowances | None = None) -> BlobAllowances:
    return BlobAllowances(gate=AllowAllGate(), metrics=Metrics(), shared=shared)


def test_a_served_manifest_gives_its_blobs_their_size_in_its_repository_only() -> None:
    here = allowances()
    assert here.expected_sizes(route(), REPO.repository, LAYER) == set()  # nothing served yet
    here.record_sizes(REPO, manifest(5))
    assert here.expected_sizes(route(), REPO.repository, LAYER) == {5}
    assert here.expected_sizes(route(), REPO.repository, CONFIG) == {6}
    assert here.expected_sizes(route(), "other/app", LAYER) == set()
    assert here.expected_sizes(route("other.example.test"), REPO.repository, LAYER) == set()


def test_manifests_that_disagree_on_a_size_bound_it_to_the_sizes_they_give() -> None:
    here = allowances()
    here.record_sizes(REPO, manifest(5))
    here.record_sizes(REPO, manifest(7))
    # One of them is wrong; the digest check decides which, but a disagreement does
    # not lift the bound: a length neither gives is still refused.
    assert here.expected_sizes(route(), REPO.repository, LAYER) == {5, 7}
    assert here.expected_sizes(route(), REPO.repository, CONFIG) == {6}


def test_a_size_recorded_by_one_worker_bounds_the_body_in_another(tmp_path: Path) -> None:
    path = tmp_path / "allowances.db"
    SharedAllowances.create(path)
    first = SharedAllowances(path, covered_fingerprint="covered")
    second = SharedAllowances(path, covered_fingerprint="covered")
    try:
        allowances(first).record_sizes(REPO, manifest(5))
        sibling = allowances(second)
        assert sibling.expected_sizes(route(), REPO.repository, LAYER) == {5}
        assert sibling.expected_sizes(route(), "other/app", LAYER) == set()
    finally:
        first.close()
        second.close()


def test_shared_sizes_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "allowances.db"
    SharedAllowances.create(path)
    shared = SharedAllowances(path, covered_fingerprint="covered", max_entries=3)
    try:
        blobs = [Digest.of(b"blob %d" % index) for index in range(5)]
        for size, blob in enumerate(blobs, start=1):
            shared.record_sizes(REPO, [(blob, size)])
        assert [shared.blob_sizes(REPO, blob) for blob in blobs] == [
            frozenset(),
            frozenset(),
            frozenset({3}),
            frozenset({4}),
            frozenset({5}),
        ]
    finally:
        shared.close()


def test_refuses_to_keep_sizes_without_bound_for_one_blob(tmp_path: Path) -> None:
    # Each allowed manifest naming the blob with yet another size (a manifest can
    # also name it many times) added one to its set, in memory and in the shared
    # table: memory without bound, and a union that grew with every size. A few are
    # kept, the first ones (the verified manifest's size is not pushed out).
    path = tmp_path / "allowances.db"
    SharedAllowances.create(path)
    shared = SharedAllowances(path, covered_fingerprint="covered")
    try:
        here = allowances(shared)
        for size in range(5, 5 + 1000):
            here.record_sizes(REPO, manifest(size))
        sizes = here.expected_sizes(route(), REPO.repository, LAYER)
        assert 5 in sizes
        assert len(sizes) <= 16
        assert len(shared.blob_sizes(REPO, LAYER)) <= 16
    finally:
        shared.close()
