"""Reference, digest, path and range parsing: examples and hypothesis properties."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.oci.digest import Digest
from proxy.oci.errors import (
    DigestInvalid,
    ManifestInvalid,
    ManifestTooLarge,
    NameInvalid,
    OCIError,
    PathInvalid,
    RangeInvalid,
    RangeNotSatisfiable,
    ReferenceInvalid,
    RouteUnknown,
    status_for,
)
from proxy.oci.manifest import MAX_MANIFEST_BYTES, parse_manifest
from proxy.oci.ranges import parse_range
from proxy.oci.reference import (
    Endpoint,
    ImageReference,
    parse_distribution_path,
    upstream_repository,
    validate_registry,
    validate_repository,
    validate_tag,
)

COMPONENT = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
REPOSITORY = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,40}", fullmatch=True)
HEX64 = st.binary(min_size=1, max_size=64).map(lambda b: hashlib.sha256(b).hexdigest())


@given(REPOSITORY, HEX64)
def test_blob_paths_round_trip(repository: str, hex_digest: str) -> None:
    parsed = parse_distribution_path(f"/v2/{repository}/blobs/sha256:{hex_digest}")
    assert parsed.endpoint is Endpoint.BLOB
    assert parsed.repository == repository
    assert str(parsed.digest) == f"sha256:{hex_digest}"


@given(REPOSITORY, TAG)
def test_manifest_tag_paths_round_trip(repository: str, tag: str) -> None:
    parsed = parse_distribution_path(f"/v2/{repository}/manifests/{tag}")
    assert parsed.endpoint is Endpoint.MANIFEST and parsed.repository == repository
    assert parsed.reference is not None and str(parsed.reference) == tag


@given(st.text(max_size=300))
def test_any_path_parses_or_raises_an_oci_error(path: str) -> None:
    try:
        parse_distribution_path("/v2/" + path)
    except OCIError as exc:
        assert 400 <= status_for(type(exc)) < 500


@given(st.text(max_size=100))
def test_any_digest_text_parses_or_raises_digest_invalid(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except DigestInvalid:
        return
    assert str(digest) == text


@given(st.binary(max_size=1000))
def test_digest_of_bytes_matches_hashlib(data: bytes) -> None:
    digest = Digest.of(data)
    assert str(digest) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Digest.parse(str(digest)) == digest and digest.matches(data)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/v2/a/../b/manifests/v1", PathInvalid),
        ("/v2/a/%2e%2e/b/manifests/v1", PathInvalid),
        ("/v2/a/%2E%2E/manifests/v1", PathInvalid),
        ("/v2/a/./manifests/v1", PathInvalid),
        ("/v2/a//b/manifests/v1", PathInvalid),
        ("/v2/" + "a/" * 1100 + "manifests/v1", PathInvalid),
        ("/v2/" + "a" * 300 + "/manifests/v1", NameInvalid),
        ("/v2/Upper/manifests/v1", NameInvalid),
        ("/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", DigestInvalid),
        ("/v2/a/blobs/sha256:abc", DigestInvalid),
        ("/v2/a/blobs/sha256:" + "A" * 64, DigestInvalid),
        ("/v2/a/blobs/sha384:" + "a" * 96, DigestInvalid),
        ("/v2/a/manifests/-tag", ReferenceInvalid),
        ("/v2/a/manifests/" + "t" * 129, ReferenceInvalid),
        ("/v2/a/blobs/uploads/x", RouteUnknown),
        ("/v1/a/manifests/v1", RouteUnknown),
    ],
)
def test_refuses_hostile_paths(path: str, error: type[OCIError]) -> None:
    with pytest.raises(error):
        parse_distribution_path(path)


def test_sha512_digests_are_accepted() -> None:
    hex_digest = hashlib.sha512(b"x").hexdigest()
    parsed = parse_distribution_path(f"/v2/a/blobs/sha512:{hex_digest}")
    assert parsed.digest is not None and parsed.digest.algorithm == "sha512"


def test_docker_hub_single_names_get_library_prefix() -> None:
    assert upstream_repository("docker.io", "alpine") == "library/alpine"
    assert upstream_repository("docker.io", "acme/app") == "acme/app"
    assert upstream_repository("ghcr.io", "alpine") == "alpine"


def test_image_references_parse_like_users_type_them() -> None:
    ref = ImageReference.parse("registry.example.test:5000/team/app:v1")
    assert (ref.registry, ref.repository, ref.tag) == (
        "registry.example.test:5000",
        "team/app",
        "v1",
    )
    hub = ImageReference.parse("alpine")
    assert (hub.registry, hub.repository, hub.tag) == ("docker.io", "alpine", "latest")
    pinned = ImageReference.parse("r.test/a@sha256:" + "a" * 64)
    assert pinned.digest is not None and pinned.tag is None
    with pytest.raises(NameInvalid):
        validate_repository("a" * 256)


@given(
    st.integers(min_value=1, max_value=10**12), st.integers(min_value=0), st.integers(min_value=0)
)
def test_ranges_are_within_the_blob_or_refused(size: int, start: int, end: int) -> None:
    for header in (f"bytes={start}-", f"bytes={start}-{end}", f"bytes=-{end}"):
        try:
            byte_range = parse_range(header, size)
        except (RangeNotSatisfiable, RangeInvalid):
            continue
        assert byte_range is not None
        assert 0 <= byte_range.start <= byte_range.end < size


def test_range_examples() -> None:
    assert parse_range(None, 10) is None
    resumed = parse_range("bytes=4-", 10)
    assert resumed is not None and (resumed.start, resumed.end) == (4, 9)
    assert resumed.content_range(10) == "bytes 4-9/10"
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=10-", 10)
    with pytest.raises(RangeInvalid):
        parse_range("bytes=1-2,4-5", 10)


def _manifest(**extra: object) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "a" * 64,
            "size": 2,
        },
        "layers": [],
        **extra,
    }
    return json.dumps(doc).encode()


def test_refuses_manifest_over_4_mib() -> None:
    raw = _manifest(annotations={"pad": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(ManifestTooLarge):
        parse_manifest(raw, "application/vnd.oci.image.manifest.v1+json")


def test_refuses_manifest_index_ambiguity_cve_2021_41190() -> None:
    raw = _manifest(manifests=[])
    with pytest.raises(ManifestInvalid):
        parse_manifest(raw, "application/vnd.oci.image.manifest.v1+json")


def test_refuses_media_type_that_contradicts_content_type() -> None:
    with pytest.raises(ManifestInvalid):
        parse_manifest(_manifest(), "application/vnd.oci.image.index.v1+json")


def test_refuses_schema1_manifests() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "a", "tag": "v1", "fsLayers": []}).encode()
    with pytest.raises(ManifestInvalid):
        parse_manifest(raw, "application/vnd.docker.distribution.manifest.v1+prettyjws")


@settings(max_examples=300)
@given(
    st.binary(max_size=2000),
    st.sampled_from([None, "application/vnd.oci.image.manifest.v1+json", "application/json"]),
)
def test_any_bytes_parse_as_manifest_or_raise_an_oci_error(
    raw: bytes, content_type: str | None
) -> None:
    try:
        manifest = parse_manifest(raw, content_type)
    except OCIError:
        return
    assert manifest.digest == Digest.of(raw)


def test_artifact_kind_survives_the_shared_store_encoding() -> None:
    from proxy.oci.manifest import ArtifactKind

    kind = ArtifactKind("application/vnd.cncf.model.manifest.v1+json", frozenset({"b", "a"}))
    assert ArtifactKind.decode(kind.encode()) == kind
    assert ArtifactKind.decode(ArtifactKind().encode()) == ArtifactKind()
    assert ArtifactKind.decode("not json") == ArtifactKind() == ArtifactKind.decode(None)


def _descriptor(seed: bytes, media_type: str = "application/vnd.oci.image.layer.v1.tar") -> str:
    digest = hashlib.sha256(seed).hexdigest()
    return f'{{"mediaType": "{media_type}", "digest": "sha256:{digest}", "size": {len(seed)}}}'


# Go's encoding/json (containerd's decoder) fills a struct field from any key that
# matches its name case-insensitively (Unicode folding: U+017F is "s", U+212A is "k"), the
# last such key winning; Python's json sees different keys. The same bytes would then
# name one set of blobs here and another in containerd.
_CONFIG = _descriptor(b"{}", "application/vnd.oci.image.config.v1+json")
_LAYER = _descriptor(b"signed layer")
_OTHER = _descriptor(b"another layer")
_OCI = '"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"'


@pytest.mark.parametrize(
    "text",
    [
        # A second config that containerd reads instead of the first.
        f'{{{_OCI}, "config": {_CONFIG}, "layers": [{_LAYER}], "Config": {_OTHER}}}',
        # Layers only containerd sees.
        f'{{{_OCI}, "config": {_CONFIG}, "layers": [], "LAYERS": [{_LAYER}]}}',
        f'{{{_OCI}, "config": {_CONFIG}, "layer\u017f": [{_LAYER}]}}',
        # A descriptor whose digest containerd reads from another key.
        f'{{{_OCI}, "config": {_CONFIG}, '
        f'"layers": [{_LAYER[:-1]}, "Digest": "sha256:{"0" * 64}"}}]}}',
        # The same key twice: which one counts is up to the reader.
        f'{{{_OCI}, "config": {_CONFIG}, "layers": [{_LAYER}], "layers": [{_OTHER}]}}',
        '{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", '
        '"MediaType": "application/vnd.oci.image.manifest.v1+json", "manifests": []}',
    ],
)
def test_refuses_manifest_keys_containerd_reads_differently(text: str) -> None:
    with pytest.raises(ManifestInvalid, match="key"):
        parse_manifest(text.encode(), None)


def test_accepts_annotations_whatever_their_keys() -> None:
    text = (
        f'{{{_OCI}, "config": {_CONFIG}, "layers": [{_LAYER}], '
        '"annotations": {"org.example.Layers": "1", "org.example.layers": "2"}}'
    )
    manifest = parse_manifest(text.encode(), None)
    assert manifest.annotations == {"org.example.Layers": "1", "org.example.layers": "2"}
    assert [str(d.digest) for d in manifest.layers] == [
        "sha256:" + hashlib.sha256(b"signed layer").hexdigest()
    ]


@pytest.mark.parametrize(
    ("parse", "text", "error"),
    [
        # ``$`` matches before a final newline: "registry.example.test\n" was a registry
        # of its own (reached at the same host, outside the policy scopes naming it).
        (validate_registry, "registry.example.test\n", NameInvalid),
        (validate_registry, "[::1]\n", NameInvalid),
        (validate_repository, "app/web\n", NameInvalid),
        (validate_tag, "v1\n", ReferenceInvalid),
        (Digest.parse, "sha256:" + "a" * 64 + "\n", DigestInvalid),
        (ImageReference.parse, "registry.example.test/app/web:1.0\n", ReferenceInvalid),
        (ImageReference.parse, "registry.example.test/app/web\n", NameInvalid),
    ],
)
def test_refuses_names_with_a_trailing_newline(
    parse: Callable[[str], object], text: str, error: type[OCIError]
) -> None:
    with pytest.raises(error):
        parse(text)


def test_refuses_manifest_with_more_json_objects_than_any_real_one() -> None:
    from proxy.oci.manifest import MAX_MANIFEST_OBJECTS

    raw = _manifest(annotations={}, padding=[{}] * MAX_MANIFEST_OBJECTS)
    assert len(raw) < MAX_MANIFEST_BYTES
    with pytest.raises(ManifestInvalid, match="JSON objects"):
        parse_manifest(raw, "application/vnd.oci.image.manifest.v1+json")
    # An index of many platforms is far below the bound.
    many = [json.loads(_descriptor(str(i).encode())) for i in range(5000)]
    for descriptor in many:
        descriptor["platform"] = {"architecture": "amd64", "os": "linux"}
        descriptor["annotations"] = {"org.example.n": "1"}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": many,
        }
    ).encode()
    assert len(parse_manifest(index, None).manifests) == 5000


@pytest.mark.parametrize(
    "text", ["registry.example.test\n/app:v1", "r.test/app\n:v1", "r.test/team/app:v1\n"]
)
def test_refuses_image_names_with_a_trailing_newline(text: str) -> None:
    # ``$`` also matches before a final newline: "app\n" would be a repository name that
    # no scope's glob matches (``.`` stops at a newline) and "r.test\n" a registry of its
    # own, so a name could slip past its scope to the default. Names are matched whole.
    with pytest.raises((NameInvalid, ReferenceInvalid)):
        ImageReference.parse(text)
