"""Manifest and index models: just what the gate and the pipeline need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.errors import DigestInvalid, ManifestInvalid, ManifestTooLarge

MAX_MANIFEST_BYTES = 4 * 1024 * 1024

# The JSON field names of the manifest, index, descriptor and platform structs. Go's
# encoding/json (containerd's decoder) fills a field from any key equal to its name
# under Unicode case folding ("Config", "LAYERS", "layer\u017f"), the last one winning,
# where Python's json reads only the exact key: the same bytes would name one config
# and set of layers here and another in containerd.
_STRUCT_FIELDS = frozenset(
    {
        "schemaVersion",
        "mediaType",
        "artifactType",
        "config",
        "layers",
        "manifests",
        "subject",
        "annotations",
        "digest",
        "size",
        "urls",
        "data",
        "platform",
        "architecture",
        "os",
        "os.version",
        "os.features",
        "variant",
        "features",
    }
)
_FOLDED_FIELDS = {name.casefold(): name for name in _STRUCT_FIELDS}
# JSON objects in one manifest (counted as "{" bytes, strings included), far above a
# real index's descriptors: each object costs the key check above a Python call, and a
# 4 MiB body of ``{},{},...`` would otherwise cost 100 MiB and half a second to decode.
MAX_MANIFEST_OBJECTS = 100_000


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, raw: Any, *, where: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise ManifestInvalid(f"{where}: descriptor is not a JSON object")
        media_type = raw.get("mediaType")
        digest = raw.get("digest")
        size = raw.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise ManifestInvalid(f"{where}: descriptor has no mediaType")
        if not isinstance(digest, str):
            raise ManifestInvalid(f"{where}: descriptor has no digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"{where}: descriptor size must be a non-negative integer")
        try:
            parsed = Digest.parse(digest)
        except DigestInvalid as exc:
            raise ManifestInvalid(f"{where}: {exc.message}") from exc
        annotations = raw.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ManifestInvalid(f"{where}: annotations must map strings to strings")
        artifact_type = raw.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise ManifestInvalid(f"{where}: artifactType must be a string")
        platform = raw.get("platform")
        return cls(
            media_type=media_type,
            digest=parsed,
            size=size,
            artifact_type=artifact_type,
            annotations=annotations,
            platform=platform if isinstance(platform, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = self.platform
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed image manifest or index, plus the exact bytes it came from."""

    media_type: str
    raw: bytes
    digest: Digest
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str]

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES

    @property
    def blob_digests(self) -> frozenset[Digest]:
        """Blobs this manifest allows: its config and layers (not child manifests)."""
        out = {d.digest for d in self.layers}
        if self.config is not None:
            out.add(self.config.digest)
        return frozenset(out)

    @property
    def effective_artifact_type(self) -> str | None:
        if self.artifact_type:
            return self.artifact_type
        if self.config is not None and self.config.media_type != mt.OCI_EMPTY:
            return self.config.media_type
        return None

    @property
    def kind(self) -> ArtifactKind:
        """What policy scopes match by type: artifact type and layer media types."""
        return ArtifactKind(
            self.effective_artifact_type, frozenset(d.media_type for d in self.layers)
        )


@dataclass(frozen=True, slots=True)
class ArtifactKind:
    """What a policy scope's ``artifactTypes`` and ``layerMediaTypes`` look at."""

    artifact_type: str | None = None
    layer_types: frozenset[str] = frozenset()

    def encode(self) -> str:
        return json.dumps([self.artifact_type, sorted(self.layer_types)], separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None) -> ArtifactKind:
        """What ``encode`` wrote; anything else reads as no type at all."""
        try:
            artifact_type, layer_types = json.loads(text or "")
            return cls(
                None if artifact_type is None else str(artifact_type),
                frozenset(str(t) for t in layer_types),
            )
        except (ValueError, TypeError):
            return cls()


def parse_manifest(raw: bytes, content_type: str | None) -> Manifest:
    """Parse manifest bytes and check them against the declared media type.

    Refuses: oversize bodies, non-JSON, schema 1, a ``mediaType`` field that
    contradicts the Content-Type, and documents that are ambiguous between a
    manifest and an index (CVE-2021-41190: both ``layers`` and ``manifests``).
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(
            f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes"
        )
    if raw.count(b"{") > MAX_MANIFEST_OBJECTS:
        raise ManifestInvalid(
            f"manifest has more than {MAX_MANIFEST_OBJECTS} JSON objects; no real one does"
        )
    try:
        doc = json.loads(raw, object_pairs_hook=_unambiguous_object)
    except (ValueError, RecursionError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    declared = (content_type or "").split(";", 1)[0].strip().lower() or None
    field_type = doc.get("mediaType")
    if field_type is not None and not isinstance(field_type, str):
        raise ManifestInvalid("manifest mediaType field is not a string")
    if doc.get("schemaVersion") == 1 or declared in (
        mt.DOCKER_MANIFEST_V1,
        mt.DOCKER_MANIFEST_V1_SIGNED,
    ):
        raise ManifestInvalid("schema 1 manifests are not supported: they cannot be verified")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2")
    has_layers = "layers" in doc
    has_manifests = "manifests" in doc
    if has_layers and has_manifests:
        raise ManifestInvalid(
            "ambiguous document: it has both 'layers' and 'manifests' (CVE-2021-41190)"
        )
    if field_type and declared and declared != "application/json" and field_type != declared:
        raise ManifestInvalid(
            f"manifest mediaType {field_type!r} does not match Content-Type {declared!r}"
        )
    media_type = field_type or (declared if declared in mt.MANIFEST_TYPES else None)
    if media_type is None:
        media_type = mt.OCI_INDEX if has_manifests else mt.OCI_MANIFEST
    if media_type not in mt.MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    is_index = media_type in mt.INDEXES
    if is_index and has_layers:
        raise ManifestInvalid(f"{media_type} must not have 'layers'")
    if not is_index and has_manifests:
        raise ManifestInvalid(f"{media_type} must not have 'manifests'")
    if not is_index and "config" not in doc:
        raise ManifestInvalid("image manifest has no config descriptor")

    def descriptors(key: str) -> tuple[Descriptor, ...]:
        items = doc.get(key) or []
        if not isinstance(items, list):
            raise ManifestInvalid(f"'{key}' must be a list")
        return tuple(
            Descriptor.from_json(item, where=f"{key}[{i}]") for i, item in enumerate(items)
        )

    config = Descriptor.from_json(doc["config"], where="config") if "config" in doc else None
    subject = Descriptor.from_json(doc["subject"], where="subject") if "subject" in doc else None
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestInvalid("annotations must be an object")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")
    return Manifest(
        media_type=media_type,
        raw=raw,
        digest=Digest.of(raw),
        config=config,
        layers=descriptors("layers"),
        manifests=descriptors("manifests"),
        subject=subject,
        artifact_type=artifact_type,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def _unambiguous_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if one of its keys is a struct field spelled otherwise
    or given twice: readers would disagree on which value counts."""
    seen: set[str] = set()
    for key, _ in pairs:
        folded = key.casefold()
        field_name = _FOLDED_FIELDS.get(folded)
        if field_name is None:
            continue
        if key != field_name or folded in seen:
            raise ManifestInvalid(
                f"ambiguous manifest key {key[:40]!r}: {field_name!r} spelled otherwise or "
                "given twice is read differently by other decoders (containerd's)"
            )
        seen.add(folded)
    return dict(pairs)


def build_index(descriptors: list[Descriptor]) -> bytes:
    """Serialise an OCI image index, as the referrers API returns it."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [d.to_json() for d in descriptors],
    }
    return json.dumps(doc, separators=(",", ":")).encode()
