"""Model artifacts: which layer of a manifest holds which model file.

Recognised packagings (all plain OCI image manifests):

* CNCF ModelPack (artifactType ``application/vnd.cncf.model.manifest.v1+json``):
  layers ``application/vnd.cncf.model.<kind>.v1.{raw,tar,tar+gzip,tar+zstd}`` with
  ``org.cncf.model.filepath`` naming the file (raw) or the file or directory (tar);
  also its earlier names (``application/vnd.cnai.model.*``, ``org.cnai.model.filepath``);
* KitOps ModelKits (``application/vnd.kitops.modelkit.*``): tar layers, same rules;
* any ORAS artifact: each layer is one file named by ``org.opencontainers.image.title``;
* KServe ModelCars are ordinary images (their layers are image tars); they are
  checked per file only when their layers carry a file path annotation.

A layer titled ``model.sig`` (or of the Sigstore bundle media type) is the model's
OMS signature shipped inside the artifact, not a model file.

An OMS signature lists files and nothing else, so the config a model-only signature
may come with is confined (``config_refusal``, ``config_content_refusal``): the empty
``{}`` or a model config that is not an image config in disguise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor, Manifest

IMAGE_CONFIGS = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
MODEL_CONFIGS = frozenset(
    {mt.MODELPACK_CONFIG, "application/vnd.cnai.model.config.v1+json", mt.MODELKIT_CONFIG}
)
EMPTY_CONFIG = Digest.of(b"{}")
# containerd's CRI image store (what pods run from) decodes the config blob as an image
# config without looking at its media type, and ``ctr images pull`` (containerd 1.6,
# tried here) unpacks the layers that a model-typed config's ``rootfs`` names. Go's JSON
# decoding matches names case-insensitively, with Unicode folding. These are the fields
# of an image config's ``config``: how its process runs.
_RUNNABLE_KEYS = frozenset(
    k.casefold()
    for k in (
        *("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir"),
        *("Labels", "StopSignal", "ArgsEscaped", "Healthcheck", "OnBuild", "Shell"),
    )
)


@dataclass(frozen=True, slots=True)
class TarLayer:
    descriptor: Descriptor
    path: str | None
    """The file or directory the layer holds (its members' common prefix), if named."""
    compression: str


@dataclass(frozen=True, slots=True)
class ModelLayout:
    raw_files: dict[str, Descriptor]
    """Model path -> the layer that is that file's bytes."""
    tar_layers: tuple[TarLayer, ...]
    signature_layers: tuple[Descriptor, ...]
    unnamed: tuple[Descriptor, ...]
    """Raw layers without a path: they cannot be matched with a signed file."""
    duplicates: tuple[str, ...] = ()
    """Paths that more than one raw layer claims."""


def _filepath(layer: Descriptor) -> str | None:
    annotations = layer.annotations or {}
    return annotations.get(mt.MODEL_FILEPATH) or annotations.get(mt.MODEL_FILEPATH_CNAI)


def layer_path(layer: Descriptor) -> str | None:
    path = _filepath(layer) or (layer.annotations or {}).get(mt.TITLE)
    if not path:
        return None
    return _clean(path)


def unsafe_layer_name(layer: Descriptor) -> str | None:
    """Why the file names ``layer``'s annotations give cannot be trusted, or None.

    An unpacker writes a layer where its title or filepath says; the checks match the
    name ``layer_path`` reads. So a name must not escape the model (absolute, ``..``),
    the two filepath annotations must agree, and a raw layer's title and filepath must
    name the same file.
    """
    annotations = layer.annotations or {}
    names = [annotations.get(k) for k in (mt.MODEL_FILEPATH, mt.MODEL_FILEPATH_CNAI, mt.TITLE)]
    for name in filter(None, names):
        if name.startswith("/"):
            return f"layer {layer.digest} names an absolute path {name[:120]}"
        if ".." in name.split("/"):
            return f"layer {layer.digest} names {name[:120]}, which escapes the model with .."
    # Both spellings of the filepath (the spec's current and earlier names) must agree:
    # pullgate reads the first, an older unpacker the second.
    cncf, cnai = annotations.get(mt.MODEL_FILEPATH), annotations.get(mt.MODEL_FILEPATH_CNAI)
    if cncf and cnai and _clean(cncf) != _clean(cnai):
        return (
            f"layer {layer.digest} names two files: {cncf[:120]} ({mt.MODEL_FILEPATH}) "
            f"and {cnai[:120]} ({mt.MODEL_FILEPATH_CNAI})"
        )
    filepath, title = _filepath(layer), annotations.get(mt.TITLE)
    # A title may be the file's base name (unpackers that flatten); then titles must be
    # unique (``layer_plans`` checks that).
    if (
        mt.layer_packing(layer.media_type) == "raw"
        and filepath
        and title
        and _clean(title) not in (_clean(filepath), _clean(filepath).rsplit("/", 1)[-1])
    ):
        return (
            f"layer {layer.digest} names two files: {filepath[:120]} (filepath) "
            f"and {title[:120]} (title)"
        )
    return None


def _clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def is_signature_layer(layer: Descriptor) -> bool:
    if layer.media_type == mt.SIGSTORE_BUNDLE_V03:
        return True
    path = layer_path(layer)
    return path is not None and path.rsplit("/", 1)[-1] == mt.MODEL_SIGNATURE_FILE


def model_layout(manifest: Manifest) -> ModelLayout:
    """Sort ``manifest``'s layers into raw files, tar layers and signatures."""
    raw: dict[str, Descriptor] = {}
    tars: list[TarLayer] = []
    signatures: list[Descriptor] = []
    unnamed: list[Descriptor] = []
    duplicates: list[str] = []
    for layer in manifest.layers:
        if is_signature_layer(layer):
            signatures.append(layer)
            continue
        packing = mt.layer_packing(layer.media_type)
        path = layer_path(layer)
        if packing != "raw":
            # A tar's title is the archive's own name; only filepath names its content.
            tars.append(TarLayer(layer, path if _filepath(layer) else None, packing))
        elif path is None:
            unnamed.append(layer)
        elif path in raw:
            duplicates.append(path)
        else:
            raw[path] = layer
    return ModelLayout(raw, tuple(tars), tuple(signatures), tuple(unnamed), tuple(duplicates))


def config_is_empty(config: Descriptor) -> bool:
    """The config is the 2-byte ``{}`` (the OCI empty descriptor, or ORAS' older
    ``application/vnd.unknown.config.v1+json``): nothing in it to check or run."""
    return config.digest == EMPTY_CONFIG and config.size == 2


def config_refusal(config: Descriptor | None) -> str | None:
    """Why a signature of the model's files alone cannot authorise ``config``, by its
    descriptor; None when it may (a model config still needs ``config_content_refusal``).

    An OMS signature covers no config, and containerd runs what an image config says
    (entrypoint, command, environment, user), so only an empty config or a model
    config's metadata may ride along with the signed files.
    """
    if config is None:
        return "the manifest has no config"
    shown = config.media_type[:100]
    if config.media_type in IMAGE_CONFIGS:
        return (
            f"the config is {shown}, a runnable image config (entrypoint, command, "
            "environment, user) that a model signature does not cover"
        )
    if config_is_empty(config) or config.media_type in MODEL_CONFIGS:
        return None
    if config.media_type == mt.OCI_EMPTY:
        return f"the config is {shown} but not the 2-byte {{}} ({config.digest})"
    return (
        f"the config is {shown}: a model signature covers only an empty config ({{}}) "
        f"or a model config ({', '.join(sorted(MODEL_CONFIGS))})"
    )


def config_content_refusal(media_type: str, content: bytes) -> str | None:
    """Why a model config blob is an image config in disguise, or None.

    containerd's CRI reads the config blob as an image config whatever its media type
    says, so a model config must carry no ``rootfs`` and no process fields under
    ``config``. Every occurrence of a key counts (Go merges a repeated object into one
    struct).
    """
    shown = media_type[:100]
    try:
        top = json.loads(content, object_pairs_hook=_Object)
    except (ValueError, RecursionError):
        return f"the {shown} config is not JSON"
    if not isinstance(top, _Object):
        return f"the {shown} config is not a JSON object"
    for key, value in top:
        if key.casefold() == "rootfs":
            return f"the {shown} config has a rootfs: it is an image config"
        if key.casefold() == "config" and isinstance(value, _Object):
            runnable = sorted({k[:40] for k, _ in value if k.casefold() in _RUNNABLE_KEYS})
            if runnable:
                return f"the {shown} config sets {', '.join(runnable)}: it is an image config"
    return None


class _Object(list[tuple[str, Any]]):
    """A JSON object as all its (key, value) pairs, repeated keys included."""
