"""Media types pullgate needs to recognise."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFESTS | INDEXES

# What pullgate asks upstreams for. Schema 1 is refused: it has no content digest
# that a signature could bind to.
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGSTORE_BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
NOTATION_SIGNATURE = "application/vnd.cncf.notary.signature"
JOSE = "application/jose+json"
COSE = "application/cose"

# ---- model artifacts -----------------------------------------------------------------
# CNCF ModelPack: an image manifest with this artifactType (and config media type);
# layers are ``application/vnd.cncf.model.<kind>.v1.<packing>`` with the path of the
# file or directory they hold in ``org.cncf.model.filepath``.
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_LAYER_PREFIX = "application/vnd.cncf.model."
# KitOps ModelKits: config ``application/vnd.kitops.modelkit.config.v1+json``, layers
# ``application/vnd.kitops.modelkit.<kind>.v1.<packing>``.
MODELKIT_PREFIX = "application/vnd.kitops.modelkit."
MODELKIT_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
MODEL_FILEPATH = "org.cncf.model.filepath"
# The same spec before it moved to the CNCF (``cnai``), still found in registries.
MODELPACK_CNAI_ARTIFACT = "application/vnd.cnai.model.manifest.v1+json"
MODELPACK_CNAI_LAYER_PREFIX = "application/vnd.cnai.model."
MODEL_FILEPATH_CNAI = "org.cnai.model.filepath"
TITLE = "org.opencontainers.image.title"
# The file an OMS signature is shipped as inside an artifact (KitOps, model_signing).
MODEL_SIGNATURE_FILE = "model.sig"

# How a layer is packed: "raw" (the blob is the file), or a tar with this compression.
_TAR_PACKINGS = (
    ("tar+gzip", "gzip"),
    ("tar+zstd", "zstd"),
    ("tar", "none"),
)
_IMAGE_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}


def layer_packing(media_type: str) -> str:
    """``raw`` or the tar compression (``none``, ``gzip``, ``zstd``) of a layer.

    ModelPack and ModelKit layers end in ``.tar``, ``.tar+gzip`` or ``.tar+zstd``
    (``.raw`` or anything else: the blob is the file); image layers are tars.
    """
    if media_type in _IMAGE_LAYERS:
        return _IMAGE_LAYERS[media_type]
    if media_type.startswith(
        (MODELPACK_LAYER_PREFIX, MODELPACK_CNAI_LAYER_PREFIX, MODELKIT_PREFIX)
    ):
        for suffix, compression in _TAR_PACKINGS:
            if media_type.endswith("." + suffix):
                return compression
    return "raw"
