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
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.oci import mediatypes as mt
from proxy.oci.manifest import Descriptor, Manifest


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
    and a raw layer's title and filepath must name the same file.
    """
    annotations = layer.annotations or {}
    names = [annotations.get(k) for k in (mt.MODEL_FILEPATH, mt.MODEL_FILEPATH_CNAI, mt.TITLE)]
    for name in filter(None, names):
        if name.startswith("/"):
            return f"layer {layer.digest} names an absolute path {name[:120]}"
        if ".." in name.split("/"):
            return f"layer {layer.digest} names {name[:120]}, which escapes the model with .."
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
