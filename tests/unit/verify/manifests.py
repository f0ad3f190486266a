"""Small OCI manifests and indexes for policy and gate tests."""

from __future__ import annotations

import json

from proxy.oci.digest import Digest
from proxy.oci.manifest import Manifest, parse_manifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def image(
    layer: bytes = b"layer",
    artifact_type: str | None = None,
    layer_type: str = "application/vnd.oci.image.layer.v1.tar",
) -> Manifest:
    """A one-layer image manifest; ``layer`` picks its digest."""
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(Digest.of(b"{}")),
            "size": 2,
        },
        "layers": [
            {
                "mediaType": layer_type,
                "digest": str(Digest.of(layer)),
                "size": len(layer),
            }
        ],
    }
    if artifact_type:
        doc["artifactType"] = artifact_type
    return parse_manifest(json.dumps(doc).encode(), OCI_MANIFEST)


def index(*children: Manifest) -> Manifest:
    """An index over ``children``."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": c.media_type, "digest": str(c.digest), "size": len(c.raw)}
            for c in children
        ],
    }
    return parse_manifest(json.dumps(doc).encode(), OCI_INDEX)
