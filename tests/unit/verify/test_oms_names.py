"""Every path a model layer is written at belongs to one layer, whatever kind of layer
(raw, tar, signature) claims it; and the signer's ignore_paths as model_signing reads them."""

from __future__ import annotations

import json

import pytest

from proxy.oci import mediatypes as mt
from proxy.verify.base import SignatureError
from proxy.verify.oms import layer_plans, parse_statement
from tests.unit.verify.test_oms import FILES, oms_statement
from tests.unit.verify.test_oms_layers import CONFIG, RAW, TGZ, WEIGHTS, layer, manifest, signature


def test_refuses_two_raw_layers_at_one_path() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, b"other weights", **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    with pytest.raises(SignatureError, match=r"file w/a\.bin is in two layers"):
        layer_plans(signature(), model, (), source="t")


def test_refuses_raw_layer_titled_as_a_tar_layers_filepath() -> None:
    model = manifest(
        layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(RAW, b"unsigned", **{mt.TITLE: "w"}),
    )
    with pytest.raises(SignatureError, match=r"file w is in two layers"):
        layer_plans(signature(), model, (), source="t")


@pytest.mark.parametrize(
    "second",
    [
        layer(mt.SIGSTORE_BUNDLE_V03, b"another bundle", **{mt.TITLE: "model.sig"}),
        layer(TGZ, b"a tar named model.sig", **{mt.MODEL_FILEPATH: "model.sig"}),
    ],
    ids=["bundle", "tar"],
)
def test_refuses_layer_at_the_verified_signature_layers_path(second: dict[str, object]) -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"bundle", **{mt.TITLE: "model.sig"}),
        second,
    )
    with pytest.raises(SignatureError, match=r"file model\.sig is in two layers"):
        layer_plans(signature(), model, (), source="t", in_artifact=model.layers[2])


def test_signer_ignore_paths_are_read_from_the_statement() -> None:
    statement = json.loads(oms_statement(FILES))
    statement["predicate"]["serialization"]["ignore_paths"] = [".git", "", "docs"]
    assert parse_statement(json.dumps(statement).encode()).ignore == (".git", "docs")


def test_refuses_statement_whose_ignore_paths_is_null() -> None:
    statement = json.loads(oms_statement(FILES))
    statement["predicate"]["serialization"]["ignore_paths"] = None
    with pytest.raises(SignatureError, match="OMS statement"):
        parse_statement(json.dumps(statement).encode())
