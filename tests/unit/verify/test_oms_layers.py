"""Which layer holds which signed file (``proxy.verify.oms.layer_plans``), and the
``model.sig`` layer form, verified at the gate with a real ``model_signing`` bundle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest, parse_manifest
from proxy.verify.base import Limits, SignatureError, Subject, TrustConfig
from proxy.verify.oms import ModelSignature, layer_plans, oms_verifier_from_spec
from tests.support import cosign_sign as cs

WEIGHTS = b"weights" * 100
CONFIG = b"{}"
SIGNED = {
    "w/a.bin": hashlib.sha256(WEIGHTS).hexdigest(),
    "config.json": hashlib.sha256(CONFIG).hexdigest(),
}
RAW = "application/vnd.cncf.model.weight.v1.raw"
TGZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
ZST = "application/vnd.kitops.modelkit.model.v1.tar+zstd"


def layer(media_type: str, data: bytes, **annotations: str) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": str(Digest.of(data)),
        "size": len(data),
        "annotations": annotations,
    }


def manifest(*layers: dict[str, Any]) -> Manifest:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELPACK_ARTIFACT,
        "config": layer(mt.MODELPACK_CONFIG, b"{}"),
        "layers": list(layers),
    }
    return parse_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST)


def signature(files: dict[str, str] = SIGNED, **kw: Any) -> ModelSignature:
    return ModelSignature(dict(files), "https://model_signing/signature/v1.0", **kw)


def test_layer_packing_by_media_type() -> None:
    assert mt.layer_packing(RAW) == "raw"
    assert mt.layer_packing(TGZ) == "gzip"
    assert mt.layer_packing(ZST) == "zstd"
    assert mt.layer_packing("application/vnd.cncf.model.weight.v1.tar") == "none"
    assert mt.layer_packing("application/vnd.oci.image.layer.v1.tar+gzip") == "gzip"
    assert mt.layer_packing("application/octet-stream") == "raw"
    assert mt.layer_packing("application/vnd.cnai.model.layer.v1.tar+gzip") == "gzip"


def test_earlier_cnai_filepath_names_a_tar_layer() -> None:
    model = manifest(
        layer("application/vnd.cnai.model.layer.v1.tar", b"t", **{"org.cnai.model.filepath": "w"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    plan = layer_plans(signature(), model, (), source="t")[Digest.of(b"t")]
    assert plan.compression == "none" and dict(plan.files) == {"w/a.bin": SIGNED["w/a.bin"]}


def test_raw_layers_need_no_plan() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    assert layer_plans(signature(), model, (), source="t") == {}


def test_tar_layer_gets_the_signed_files_under_its_filepath() -> None:
    model = manifest(
        layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    plans = layer_plans(signature(), model, (), source="key k")
    plan = plans[Digest.of(b"tar-1")]
    assert plan.compression == "gzip" and plan.files == (("w/a.bin", SIGNED["w/a.bin"]),)
    assert plan.source == "key k"


def test_one_tar_layer_without_filepath_holds_the_rest() -> None:
    model = manifest(layer(ZST, b"tar-1"), layer(RAW, CONFIG, **{mt.TITLE: "config.json"}))
    plan = layer_plans(signature(), model, (), source="t")[Digest.of(b"tar-1")]
    assert plan.compression == "zstd" and dict(plan.files) == {"w/a.bin": SIGNED["w/a.bin"]}


def test_refuses_two_tar_layers_without_filepath() -> None:
    model = manifest(layer(TGZ, b"tar-1"), layer(TGZ, b"tar-2"))
    with pytest.raises(SignatureError, match="which files each holds"):
        layer_plans(signature(), model, (), source="t")


def test_refuses_signed_file_no_layer_holds() -> None:
    model = manifest(layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}))
    with pytest.raises(SignatureError, match=r"signed file config\.json is not in the model"):
        layer_plans(signature(), model, (), source="t")


def test_refuses_file_claimed_by_two_layers() -> None:
    model = manifest(
        layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}),
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    with pytest.raises(SignatureError, match=r"w/a\.bin is in two layers"):
        layer_plans(signature(), model, (), source="t")


def test_refuses_raw_layer_with_wrong_digest_next_to_tar_layers() -> None:
    model = manifest(
        layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}),
        layer(RAW, b"other", **{mt.TITLE: "config.json"}),
    )
    with pytest.raises(SignatureError, match=r"config\.json has digest"):
        layer_plans(signature(), model, (), source="t")


def test_signer_ignore_paths_and_policy_ignore_paths_reach_the_plan() -> None:
    model = manifest(layer(TGZ, b"tar-1"))
    sig = signature(ignore=(".git",), allow_symlinks=True)
    plan = layer_plans(sig, model, ("README",), source="t")[Digest.of(b"tar-1")]
    assert {"README", ".git"} <= set(plan.ignore) and plan.allow_symlinks
    assert dict(plan.signed) == SIGNED


def _sign_model(tmp_path: Path) -> bytes:
    """``w/a.bin`` and ``config.json`` signed by model_signing with a fresh EC key
    (public key at ``tmp_path/k.pub``): the ``model.sig`` bundle."""
    import model_signing
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path / "model"
    (folder / "w").mkdir(parents=True)
    (folder / "w" / "a.bin").write_bytes(WEIGHTS)
    (folder / "config.json").write_bytes(CONFIG)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "k.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    model_signing.signing.Config().use_elliptic_key_signer(private_key=tmp_path / "k.pem").sign(
        folder, tmp_path / "model.sig"
    )
    return (tmp_path / "model.sig").read_bytes()


async def test_model_sig_layer_verifies_and_hands_plans_to_the_source(tmp_path: Path) -> None:
    bundle = _sign_model(tmp_path)
    registry = cs.MemoryRegistry()
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELKIT_CONFIG,
        "config": layer(mt.MODELKIT_CONFIG, b"{}"),
        "layers": [
            layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w"}),
            layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
            layer(mt.SIGSTORE_BUNDLE_V03, bundle, **{mt.TITLE: "model.sig"}),
        ],
    }
    raw = json.dumps(doc).encode()
    registry.push_blob(bundle)
    digest = registry.push_manifest("v1", raw, mt.OCI_MANIFEST)
    verifier = oms_verifier_from_spec({"key": "k.pub"}, base_dir=tmp_path, trust=TrustConfig())
    subject = Subject("r.test", "models/kit", digest, mt.OCI_MANIFEST, len(raw))
    result = await verifier.verify(subject, registry, Limits())
    assert result.ok and "model.sig layer verified" in result.reason, result.reason
    plan = registry.layer_plans[Digest.of(b"tar-1")]
    assert dict(plan.files) == {"w/a.bin": SIGNED["w/a.bin"]}
    # The same bundle inside another model (a config file changed) is refused.
    doc["layers"][1] = layer(RAW, b"{ }", **{mt.TITLE: "config.json"})
    raw = json.dumps(doc).encode()
    other = registry.push_manifest("v2", raw, mt.OCI_MANIFEST)
    subject = Subject("r.test", "models/kit", other, mt.OCI_MANIFEST, len(raw))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "config.json" in result.reason


# ---- hostile layouts: a signature layer or a name that dodges the file check ------------


def test_refuses_model_sig_layer_named_as_a_model_file() -> None:
    # The verified model.sig layer, retitled as a signed file, must not hide that file
    # (its path was skipped like an ignore rule, so a swapped w/a.bin went unchecked).
    model = manifest(
        layer(RAW, b"evil weights", **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"bundle", **{mt.TITLE: "w/a.bin"}),
    )
    with pytest.raises(SignatureError, match=r"w/a\.bin"):
        layer_plans(signature(), model, (), source="t", in_artifact=model.layers[2])


def test_refuses_model_sig_layer_named_as_a_directory_of_the_model() -> None:
    model = manifest(
        layer(TGZ, b"evil tar", **{mt.MODEL_FILEPATH: "w"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"bundle", **{mt.TITLE: "w"}),
    )
    with pytest.raises(SignatureError):
        layer_plans(signature(), model, (), source="t", in_artifact=model.layers[2])


def test_refuses_file_under_the_model_sig_path() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(RAW, b"unsigned", **{mt.TITLE: "model.sig/extra.bin"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"bundle", **{mt.TITLE: "model.sig"}),
    )
    with pytest.raises(SignatureError, match=r"model\.sig/extra\.bin is not covered"):
        layer_plans(signature(), model, (), source="t", in_artifact=model.layers[3])


def test_refuses_unverified_signature_layer_titled_as_a_model_file() -> None:
    # Verified through a referrer: a bundle-typed layer titled as a weight file is
    # bytes the signature never covered, written over the signed file by an unpacker.
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"evil weights", **{mt.TITLE: "w/a.bin"}),
    )
    with pytest.raises(SignatureError, match=r"w/a\.bin"):
        layer_plans(signature(), model, (), source="t")


def test_refuses_second_model_sig_layer_next_to_the_verified_one() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(mt.SIGSTORE_BUNDLE_V03, b"bundle", **{mt.TITLE: "model.sig"}),
        layer(RAW, b"anything at all", **{mt.TITLE: "w/model.sig"}),
    )
    with pytest.raises(SignatureError, match=r"w/model\.sig"):
        layer_plans(signature(), model, (), source="t", in_artifact=model.layers[2])


def test_refuses_raw_layer_escaping_with_dotdot_under_an_ignored_path() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(RAW, b"payload", **{mt.TITLE: "docs/../../../home/u/.bashrc"}),
    )
    with pytest.raises(SignatureError, match=r"escapes"):
        layer_plans(signature(), model, ("docs",), source="t")


def test_refuses_raw_layer_with_an_absolute_path() -> None:
    files = {"etc/cron.d/x": hashlib.sha256(CONFIG).hexdigest()}
    model = manifest(layer(RAW, CONFIG, **{mt.TITLE: "/etc/cron.d/x"}))
    with pytest.raises(SignatureError, match=r"absolute"):
        layer_plans(signature(files), model, (), source="t")


def test_refuses_raw_layer_whose_title_and_filepath_disagree() -> None:
    # Checked as config.json (filepath), written as w/a.bin by a title-based unpacker.
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "config.json", mt.TITLE: "w/a.bin"}),
    )
    with pytest.raises(SignatureError, match=r"names two files"):
        layer_plans(signature(), model, (), source="t")


@pytest.mark.parametrize("packing", [RAW, TGZ])
def test_refuses_layer_whose_cncf_and_cnai_filepaths_disagree(packing: str) -> None:
    # Checked as .git/x (ignored by model_signing's defaults), written over w/a.bin by an
    # unpacker that reads the spec's earlier annotation (org.cnai.model.filepath).
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
        layer(
            packing,
            b"unsigned",
            **{mt.MODEL_FILEPATH: ".git/x", mt.MODEL_FILEPATH_CNAI: "w/a.bin"},
        ),
    )
    with pytest.raises(SignatureError, match=r"names two files"):
        layer_plans(signature(ignore=(".git",)), model, (), source="t")


def test_refuses_raw_layers_whose_titles_name_one_file() -> None:
    # Titles as base names: both layers would be written as a.bin by a title-based unpacker.
    files = {**SIGNED, "a.bin": hashlib.sha256(CONFIG).hexdigest()}
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin", mt.TITLE: "a.bin"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "a.bin", mt.TITLE: "a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    with pytest.raises(SignatureError, match=r"a\.bin is in two layers"):
        layer_plans(signature(files), model, (), source="t")


def test_refuses_layer_titled_as_another_layers_file() -> None:
    # Titled a.bin beside the untitled a.bin layer: a title-based unpacker writes w/a.bin's
    # bytes as a.bin (or skips the untitled layer and keeps them there).
    files = {**SIGNED, "a.bin": hashlib.sha256(CONFIG).hexdigest()}
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin", mt.TITLE: "a.bin"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "config.json"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "a.bin"}),
    )
    with pytest.raises(SignatureError, match=r"a\.bin is in two layers"):
        layer_plans(signature(files), model, (), source="t")


@pytest.mark.parametrize("packing", [RAW, TGZ])
def test_refuses_layer_under_an_ignore_rule_titled_outside_it(packing: str) -> None:
    # Unchecked as .git/run.py (ignored); a title-based unpacker writes it as run.py, a
    # file the signature does not list and no ignore rule leaves out.
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "config.json"}),
        layer(packing, b"unsigned", **{mt.MODEL_FILEPATH: ".git/run.py", mt.TITLE: "run.py"}),
    )
    with pytest.raises(SignatureError, match=r"titled run\.py"):
        layer_plans(signature(ignore=(".git",)), model, (), source="t")
    # Titled under the rule too, it is what the ignore rule leaves out.
    fine = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin"}),
        layer(RAW, CONFIG, **{mt.MODEL_FILEPATH: "config.json"}),
        layer(RAW, b"unsigned", **{mt.MODEL_FILEPATH: ".git/HEAD", mt.TITLE: ".git/HEAD"}),
    )
    assert layer_plans(signature(ignore=(".git",)), fine, (), source="t") == {}


def test_raw_layer_title_may_be_the_base_name_of_its_filepath() -> None:
    model = manifest(
        layer(RAW, WEIGHTS, **{mt.MODEL_FILEPATH: "w/a.bin", mt.TITLE: "a.bin"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    assert layer_plans(signature(), model, (), source="t") == {}


def test_refuses_tar_layer_titled_as_a_raw_file() -> None:
    # A title-based unpacker writes the archive as config.json over the signed file.
    model = manifest(
        layer(TGZ, b"tar-1", **{mt.MODEL_FILEPATH: "w", mt.TITLE: "config.json"}),
        layer(RAW, CONFIG, **{mt.TITLE: "config.json"}),
    )
    with pytest.raises(SignatureError, match=r"config\.json is in two layers"):
        layer_plans(signature(), model, (), source="t")


async def test_refuses_real_model_sig_layer_retitled_over_a_swapped_file(tmp_path: Path) -> None:
    """End to end with a real model_signing bundle: the model.sig layer retitled
    config.json must not exempt a swapped config.json from the check."""
    bundle = _sign_model(tmp_path)
    evil = b'{"trust_remote_code": true}'
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELPACK_ARTIFACT,
        "config": layer(mt.MODELPACK_CONFIG, b"{}"),
        "layers": [
            layer(RAW, WEIGHTS, **{mt.TITLE: "w/a.bin"}),
            layer(RAW, evil, **{mt.TITLE: "config.json"}),
            layer(mt.SIGSTORE_BUNDLE_V03, bundle, **{mt.TITLE: "config.json"}),
        ],
    }
    raw = json.dumps(doc).encode()
    registry = cs.MemoryRegistry()
    registry.push_blob(bundle)
    digest = registry.push_manifest("v1", raw, mt.OCI_MANIFEST)
    verifier = oms_verifier_from_spec({"key": "k.pub"}, base_dir=tmp_path, trust=TrustConfig())
    subject = Subject("r.test", "models/kit", digest, mt.OCI_MANIFEST, len(raw))
    result = await verifier.verify(subject, registry, Limits())
    assert not result.ok and "config.json" in result.reason, result.reason
