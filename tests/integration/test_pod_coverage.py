"""Index coverage across pull contexts: a child manifest covered by an index that a
pod's scope verified is that pod's alone. Real docker-registry upstream, real
containerd behind pullgate's CRI front end, and the mirror without a pod's grant."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2
from proxy.oci import mediatypes as mt
from tests.support import cosign_sign as cs
from tests.support.cri import cri_pullgate, image_service, sign_image
from tests.support.ocilayout import (
    PushedArtifact,
    deterministic_bytes,
    push_image,
    push_manifest,
)
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"

# Everyone needs the release key; pods in ml-dev accept the dev key instead.
POLICY = """\
default: deny
scopes:
  - match: "registry.example.test/**"
    require: {cosign: {key: keys/release.pub}}
  - match: "registry.example.test/**"
    namespaces: [ml-dev]
    require: {cosign: {key: keys/dev.pub}}
"""
RELEASE_REFUSAL = (
    'scope "registry.example.test/**" (enforce): '
    "no cosign signature verified with key keys/release.pub"
)


def _push_index(registry: Registry, repository: str, child: PushedArtifact) -> PushedArtifact:
    """A one-platform OCI index (linux/amd64) over ``child``, tagged v1."""
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": child.media_type,
                    "digest": child.manifest_digest,
                    "size": len(child.manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        },
        separators=(",", ":"),
    ).encode()
    digest = push_manifest(registry.url, repository, "v1", raw, mt.OCI_INDEX)
    return PushedArtifact(repository, "v1", digest, raw, mt.OCI_INDEX, {})


def _pull(images: Any, image: str, namespace: str) -> Any:
    return images.PullImage(
        api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=f"{REGISTRY}/{image}"),
            sandbox_config=api_pb2.PodSandboxConfig(
                metadata=api_pb2.PodSandboxMetadata(name="job", namespace=namespace)
            ),
        ),
        timeout=120,
    )


def test_refuses_child_covered_only_under_another_pods_scope(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    policy = tmp_path / "policy" / "policy.yaml"
    cs.generate_key().write_public(policy.parent / "keys" / "release.pub")
    dev = cs.generate_key()
    dev.write_public(policy.parent / "keys" / "dev.pub")
    policy.write_text(POLICY)
    child = push_image(registry.url, "pods/app", "v1-amd64", layers=[deterministic_bytes(5000, 71)])
    index = _push_index(registry, "pods/app", child)
    sign_image(registry, dev, REGISTRY, index)  # the index only, as cosign sign does
    pullgate, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name=REGISTRY, policy=policy
    )
    with image_service(socket) as images:
        # ml-dev: its scope verifies the index with the dev key, and containerd's pull
        # of the platform child (by digest, with the pod's grant) is covered by it.
        pulled = _pull(images, "pods/app:v1", "ml-dev")
        assert pulled.image_ref.startswith("sha256:")
        assert sum(registry.blob_gets(b) for b in child.blobs) == len(child.blobs)
        # The mirror without a pod's grant does not get the child on ml-dev's coverage:
        # refused with the reason, and a challenge.
        url = f"{pullgate.url}/v2/pods/app/manifests/{child.manifest_digest}?ns={REGISTRY}"
        request = urllib.request.Request(url, headers={"Accept": child.media_type})
        with pytest.raises(urllib.error.HTTPError) as mirror:
            urllib.request.urlopen(request, timeout=30)
        body = mirror.value.read()
        assert mirror.value.code == 401
        assert child.manifest_bytes not in body
        (error,) = json.loads(body)["errors"]
        assert error["code"] == "DENIED"
        assert RELEASE_REFUSAL in error["message"] and "no pod context" in error["message"]
        # Nor does a pod of another namespace, pulling the child by digest.
        with pytest.raises(grpc.RpcError) as refused_child:
            _pull(images, f"pods/app@{child.manifest_digest}", "prod")
        assert refused_child.value.code() is grpc.StatusCode.PERMISSION_DENIED
        details = refused_child.value.details() or ""
        assert f"{REGISTRY}/pods/app@{child.manifest_digest}" in details
        assert RELEASE_REFUSAL in details
        # (Its scope refuses the index itself, which is why.)
        with pytest.raises(grpc.RpcError) as refused_index:
            _pull(images, "pods/app:v1", "prod")
        assert refused_index.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert RELEASE_REFUSAL in (refused_index.value.details() or "")


# Pods in prod need every platform signed; everyone else is only warned.
STRICT_FOR_PROD = """\
default: deny
scopes:
  - match: "registry.example.test/**"
    mode: warn
    require: {cosign: {key: keys/release.pub}}
  - match: "registry.example.test/**"
    namespaces: [prod]
    indexes: eachChild
    require: {cosign: {key: keys/release.pub}}
"""


@pytest.mark.parametrize("nested", [False, True], ids=["index", "index-in-index"])
def test_refuses_a_child_the_pods_stricter_scope_refuses_though_the_mirror_lets_it_through(
    nested: bool,
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    # containerd presents the pod's grant only after a challenge, and the mirror
    # challenges only where the answer without a pod is no. Here the answer without a
    # pod (warn) is yes, so containerd's pull of the child never carries prod's grant:
    # the CRI front end must decide the index's children under the pod's own scope.
    policy = tmp_path / "policy" / "policy.yaml"
    release = cs.generate_key()
    release.write_public(policy.parent / "keys" / "release.pub")
    policy.write_text(STRICT_FOR_PROD)
    child = push_image(
        registry.url, "pods/strict", "v1-amd64", layers=[deterministic_bytes(5000, 73)]
    )
    index = _push_index(registry, "pods/strict", child)
    if nested:  # containerd follows an index in an index, and so must the CRI check
        sign_image(registry, release, REGISTRY, index)
        index = _push_index(registry, "pods/strict", index)
    sign_image(registry, release, REGISTRY, index)  # indexes only: the child is unsigned
    _, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name=REGISTRY, policy=policy
    )
    with image_service(socket) as images:
        with pytest.raises(grpc.RpcError) as refused:
            _pull(images, "pods/strict:v1", "prod")
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert child.manifest_digest in (refused.value.details() or "")
        assert "decided for the pod" in (refused.value.details() or "")
        listed = images.ListImages(api_pb2.ListImagesRequest(), timeout=30)
        assert [image.repo_digests for image in listed.images] == []
        assert sum(registry.blob_gets(b) for b in child.blobs) == 0
        # Anywhere else the warn scope lets it through, as the policy says.
        assert _pull(images, "pods/strict:v1", "dev").image_ref.startswith("sha256:")
