"""Fuzzing everything hostile input reaches: over 100,000 generated inputs per run.

Invariant: parsers either succeed or raise their documented error type (an OCIError,
SignatureError or PolicyError), never anything else. The seed is printed in
pytest's header (``fuzz seed: PULLGATE_FUZZ_SEED=...``); set that variable to replay.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cbor2
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError
from proxy.oci.manifest import parse_manifest
from proxy.oci.ranges import parse_range
from proxy.oci.reference import ImageReference, parse_distribution_path
from proxy.upstream.auth import parse_challenge
from proxy.verify.base import PolicyError, SignatureError
from proxy.verify.notation import cbor_item, parse_cose, parse_jws
from proxy.verify.policy import parse_policy
from tests.support import counts
from tests.support.fuzzseed import SEED

FAST = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}

PATH_ALPHABET = st.sampled_from([*list("abz09._-/:%@+=ABZ"), "..", "sha256:", "manifests", "blobs"])
PATHS = st.one_of(st.text(max_size=200), st.lists(PATH_ALPHABET, max_size=40).map("".join))


@seed(SEED)
@settings(max_examples=30_000, **FAST)
@given(PATHS)
def test_fuzz_distribution_paths(path: str) -> None:
    counts.add("fuzz inputs")
    with contextlib.suppress(OCIError):
        parse_distribution_path("/v2/" + path)


@seed(SEED)
@settings(max_examples=15_000, **FAST)
@given(st.one_of(st.text(max_size=150), st.from_regex(r"[a-z0-9+._-]{0,10}:[0-9a-fA-F]{0,130}")))
def test_fuzz_digests(text: str) -> None:
    counts.add("fuzz inputs")
    with contextlib.suppress(OCIError):
        Digest.parse(text)


@seed(SEED)
@settings(max_examples=10_000, **FAST)
@given(st.text(max_size=120))
def test_fuzz_image_references(text: str) -> None:
    counts.add("fuzz inputs")
    with contextlib.suppress(OCIError):
        ImageReference.parse(text)


@seed(SEED)
@settings(max_examples=15_000, **FAST)
@given(
    st.one_of(st.text(max_size=60), st.from_regex(r"bytes=[0-9]{0,22}-[0-9]{0,22}(,[0-9-]{0,5})?")),
    st.integers(min_value=0, max_value=2**63),
)
def test_fuzz_range_headers(header: str, size: int) -> None:
    counts.add("fuzz inputs")
    try:
        byte_range = parse_range(header, size)
    except OCIError:
        return
    if byte_range is not None:
        assert 0 <= byte_range.start <= byte_range.end < size


@seed(SEED)
@settings(max_examples=10_000, **FAST)
@given(st.text(max_size=300))
def test_fuzz_www_authenticate(header: str) -> None:
    counts.add("fuzz inputs")
    challenge = parse_challenge("Bearer " + header)
    if challenge is not None:
        assert challenge.scheme == "bearer"
    parse_challenge(header)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
DESCRIPTOR = st.fixed_dictionaries(
    {"mediaType": st.text(max_size=40), "digest": st.text(max_size=80), "size": st.integers()},
    optional={"artifactType": st.text(max_size=20), "annotations": JSON},
)
MANIFESTS = st.fixed_dictionaries(
    {"schemaVersion": st.sampled_from([1, 2, 3, "2"])},
    optional={
        "mediaType": st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "text/plain",
            ]
        ),
        "config": DESCRIPTOR,
        "layers": st.lists(DESCRIPTOR, max_size=3),
        "manifests": st.lists(DESCRIPTOR, max_size=3),
        "subject": DESCRIPTOR,
        "artifactType": st.text(max_size=30),
        "annotations": JSON,
    },
)


@seed(SEED)
@settings(max_examples=10_000, **FAST)
@given(
    st.one_of(MANIFESTS.map(lambda d: json.dumps(d).encode()), st.binary(max_size=300)),
    st.sampled_from(
        [
            None,
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
        ]
    ),
)
def test_fuzz_manifests(raw: bytes, content_type: str | None) -> None:
    counts.add("fuzz inputs")
    try:
        manifest = parse_manifest(raw, content_type)
    except OCIError:
        return
    assert manifest.digest == Digest.of(raw)


@seed(SEED)
@settings(max_examples=8_000, **FAST)
@given(st.binary(max_size=300))
def test_fuzz_cbor(data: bytes) -> None:
    """The COSE entry points over cbor2: the decoder alone, and the whole envelope parse
    with the input as the envelope and as its protected header."""
    counts.add("fuzz inputs")
    with contextlib.suppress(SignatureError):
        cbor_item(data, "fuzz input")
    with contextlib.suppress(SignatureError):
        parse_cose(data)
    with contextlib.suppress(SignatureError):
        parse_cose(cbor2.dumps(cbor2.CBORTag(18, [data, {33: [data]}, data, data])))


@seed(SEED)
@settings(max_examples=5_000, **FAST)
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda d: json.dumps(d).encode())))
def test_fuzz_notation_envelopes(data: bytes) -> None:
    counts.add("fuzz inputs")
    for parse in (parse_jws, parse_cose):
        with contextlib.suppress(SignatureError):
            parse(data)


@seed(SEED)
@settings(max_examples=3_000, **FAST)
@given(st.one_of(st.text(max_size=200), JSON.map(json.dumps)))
def test_fuzz_policy_files(text: str) -> None:
    counts.add("fuzz inputs")
    with contextlib.suppress(PolicyError):
        parse_policy(text.encode(), base_dir=Path("/nonexistent"))
