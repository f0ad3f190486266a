"""CRI ImageService front end with containerd's real CRI behind it."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2, api_pb2_grpc
from tests.support import cosign_sign as cs
from tests.support.cri import cri_pullgate, image_service, sign_image
from tests.support.ocilayout import (
    MODEL_ARTIFACT,
    PushedArtifact,
    deterministic_bytes,
    push_image,
    push_model,
)
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"


def _policy_with_key(tmp_path: Path, key_name: str, *scopes: str) -> tuple[cs.TestKey, Path]:
    """A new cosign key under ``policy/keys/`` and a deny-by-default policy of
    ``scopes`` (YAML lines) beside it."""
    key = cs.generate_key()
    key.write_public(tmp_path / "policy" / "keys" / key_name)
    policy = tmp_path / "policy" / "policy.yaml"
    policy.write_text("default: deny\nscopes:\n" + "".join(scopes))
    return key, policy


def test_cri_pull_verifies_first_and_denies_with_the_policy_reason(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    key, policy = _policy_with_key(
        tmp_path,
        "release.pub",
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n",
    )
    signed = push_image(registry.url, "cri/app", "signed", layers=[deterministic_bytes(4096, 61)])
    sign_image(registry, key, REGISTRY, signed)
    unsigned = push_image(
        registry.url, "cri/app", "unsigned", layers=[deterministic_bytes(4096, 62)]
    )
    pullgate, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name=REGISTRY, policy=policy
    )
    with image_service(socket) as images:
        pulled = images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/app:signed")),
            timeout=120,
        )
        assert pulled.image_ref.startswith("sha256:")

        with pytest.raises(grpc.RpcError) as refused:
            images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/app:unsigned")
                ),
                timeout=120,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "DENIED" in (refused.value.details() or "")
        assert "cosign key keys/release.pub" in (refused.value.details() or "")

        # containerd was asked for the verified digest, not the tag.
        listed = images.ListImages(api_pb2.ListImagesRequest(), timeout=30)
        digests = {d for image in listed.images for d in image.repo_digests}
        assert digests == {f"{REGISTRY}/cri/app@{signed.manifest_digest}"}
        status = images.ImageStatus(
            api_pb2.ImageStatusRequest(
                image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/app@{signed.manifest_digest}")
            ),
            timeout=30,
        )
        assert status.image.id == pulled.image_ref
    assert sum(registry.blob_gets(b) for b in unsigned.blobs) == 0
    # CRI decisions show in the same metrics, labelled by front end.
    metrics = pullgate.metrics()
    assert metrics['pullgate_denied_total{front="cri",kind="manifest"}'] == 1
    assert metrics['pullgate_verdicts_total{front="cri",mode="enforce",result="allow"}'] >= 1
    assert metrics['pullgate_verdicts_total{front="mirror",mode="enforce",result="allow"}'] >= 1


def test_cri_refuses_an_unsigned_model_artifact_as_image_volumes_pull_it(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    # Kubernetes image volumes pull an artifact through the same PullImage call.
    key, policy = _policy_with_key(
        tmp_path,
        "models.pub",
        '  - match: "registry.example.test/models/**"\n'
        f'    artifactTypes: ["{MODEL_ARTIFACT}"]\n'
        "    require: {cosign: {key: keys/models.pub}}\n",
    )
    weights = {"model.safetensors": deterministic_bytes(40_000, 63), "config.json": b"{}"}
    signed = push_model(registry.url, "models/llm", "signed", files=weights)
    sign_image(registry, key, REGISTRY, signed)
    unsigned = push_model(
        registry.url,
        "models/llm",
        "unsigned",
        files={"model.safetensors": deterministic_bytes(40_000, 64)},
    )
    pullgate, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name=REGISTRY, policy=policy
    )
    with image_service(socket) as images:
        with pytest.raises(grpc.RpcError) as refused:
            images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/models/llm:unsigned")
                ),
                timeout=120,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        details = refused.value.details() or ""
        assert "DENIED" in details and "verified with key keys/models.pub" in details
        assert sum(registry.blob_gets(b) for b in unsigned.blobs) == 0

        # The signed model passes pullgate; containerd 1.6's CRI then fetches it
        # through the mirror but cannot unpack a non-image artifact into a snapshot
        # (image volumes need containerd 2.1 or later): its own error comes back as is.
        try:
            images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/models/llm:signed")
                ),
                timeout=120,
            )
        except grpc.RpcError as exc:
            # containerd 1.6: "failed to unpack image on snapshotter overlayfs:
            # mismatched image rootfs and manifest layers".
            assert "failed to unpack image" in (exc.details() or "")
            assert exc.code() is not grpc.StatusCode.PERMISSION_DENIED
        assert f"verified as {signed.manifest_digest}" in pullgate.log_text()


class _MovesTheTagFirst(api_pb2_grpc.ImageServiceServicer):
    """Between pullgate and containerd: moves the tag upstream just before containerd
    is asked to pull, i.e. after pullgate verified what the tag named."""

    def __init__(self, runtime: Any, move: Callable[[], None]) -> None:
        self._runtime = runtime
        self._move = move
        self.forwarded: list[str] = []

    def PullImage(self, request: Any, context: Any) -> Any:
        self._move()
        self.forwarded.append(request.image.image)
        return self._runtime.PullImage(request, timeout=120)

    def ImageStatus(self, request: Any, context: Any) -> Any:
        return self._runtime.ImageStatus(request, timeout=30)

    def ListImages(self, request: Any, context: Any) -> Any:
        return self._runtime.ListImages(request, timeout=30)


def test_cri_pull_of_a_tag_moved_after_verification_gets_the_verified_digest(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    key, policy = _policy_with_key(
        tmp_path,
        "release.pub",
        '  - match: "registry.example.test/**"\n    require: {cosign: {key: keys/release.pub}}\n',
    )
    signed = push_image(registry.url, "cri/moving", "v1", layers=[deterministic_bytes(4096, 65)])
    sign_image(registry, key, REGISTRY, signed)
    moved: list[PushedArtifact] = []

    def move_the_tag() -> None:
        layer = deterministic_bytes(4096, 66)
        moved.append(push_image(registry.url, "cri/moving", "v1", layers=[layer]))

    runtime_channel = grpc.insecure_channel(f"unix://{containerd.socket}")
    interposer = _MovesTheTagFirst(
        api_pb2_grpc.ImageServiceStub(runtime_channel),  # type: ignore[no-untyped-call]
        move_the_tag,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_ImageServiceServicer_to_server(interposer, server)  # type: ignore[no-untyped-call]
    between = tmp_path / "between.sock"
    server.add_insecure_port(f"unix://{between}")
    server.start()
    try:
        _, socket = cri_pullgate(
            tmp_path,
            make_pullgate,
            registry,
            containerd,
            name=REGISTRY,
            runtime=f"unix://{between}",
            policy=policy,
        )
        with image_service(socket) as images:
            pulled = images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/moving:v1")
                ),
                timeout=120,
            )
            (new,) = moved
            assert new.manifest_digest != signed.manifest_digest
            # containerd was asked for the digest pullgate verified, and has it.
            assert interposer.forwarded == [f"{REGISTRY}/cri/moving@{signed.manifest_digest}"]
            status = images.ImageStatus(
                api_pb2.ImageStatusRequest(
                    image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/moving@{signed.manifest_digest}")
                ),
                timeout=30,
            )
            assert status.image.id == pulled.image_ref
            listed = images.ListImages(api_pb2.ListImagesRequest(), timeout=30)
            digests = {d for image in listed.images for d in image.repo_digests}
            assert f"{REGISTRY}/cri/moving@{new.manifest_digest}" not in digests
        # Not one byte of the unverified manifest's content was fetched.
        assert all(registry.blob_gets(layer) == 0 for layer in new.layer_digests)
    finally:
        server.stop(grace=None)
        runtime_channel.close()


def test_cri_namespace_warn_scope_lets_an_unsigned_image_through_for_that_namespace_only(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    _, policy = _policy_with_key(
        tmp_path,
        "release.pub",
        '  - match: "registry.example.test/**"\n'
        "    require: {cosign: {key: keys/release.pub}}\n"
        '  - match: "registry.example.test/**"\n'
        "    namespaces: [ml-dev]\n"
        "    mode: warn\n"
        "    require: {cosign: {key: keys/release.pub}}\n",
    )
    unsigned = push_image(registry.url, "cri/dev", "v1", layers=[deterministic_bytes(6000, 67)])
    pullgate, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name=REGISTRY, policy=policy
    )

    def pull(namespace: str) -> Any:
        return images.PullImage(
            api_pb2.PullImageRequest(
                image=api_pb2.ImageSpec(image=f"{REGISTRY}/cri/dev:v1"),
                sandbox_config=api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(name="job", namespace=namespace)
                ),
            ),
            timeout=120,
        )

    with image_service(socket) as images:
        # Another namespace: the enforcing scope refuses it, before containerd is asked.
        with pytest.raises(grpc.RpcError) as refused:
            pull("prod")
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "no cosign signature verified" in (refused.value.details() or "")
        assert sum(registry.blob_gets(b) for b in unsigned.blobs) == 0
        # ml-dev: the warn scope lets it through, all the way into containerd (whose
        # pull through the mirror carries the pod's grant).
        pulled = pull("ml-dev")
        assert pulled.image_ref.startswith("sha256:")
        # prod again, with everything cached and ml-dev's decision fresh: still refused.
        with pytest.raises(grpc.RpcError) as again:
            pull("prod")
        assert again.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "for pods in namespaces ml-dev (warn)" in pullgate.log_text()
    # The mirror without a pod's grant: refused, with a challenge and the reason.
    url = f"{pullgate.url}/v2/cri/dev/manifests/{unsigned.manifest_digest}?ns={REGISTRY}"
    request = urllib.request.Request(url, headers={"Accept": unsigned.media_type})
    with pytest.raises(urllib.error.HTTPError) as mirror:
        urllib.request.urlopen(request, timeout=30)
    assert mirror.value.code == 401
    assert mirror.value.headers["WWW-Authenticate"].startswith("Basic")
    (error,) = json.loads(mirror.value.read())["errors"]
    assert error["code"] == "DENIED" and "no pod context" in error["message"]
    # A forged grant is refused too.
    forged = base64.b64encode(b"pullgate-pod-pull:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").decode()
    request.add_header("Authorization", f"Basic {forged}")
    with pytest.raises(urllib.error.HTTPError) as forged_pull:
        urllib.request.urlopen(request, timeout=30)
    assert forged_pull.value.code == 403
    assert "not one this node issued" in forged_pull.value.read().decode()


def test_cri_pull_of_a_docker_hub_single_name_carries_a_grant_the_mirror_accepts(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    # kubelet passes "tool:v1" as the pod spec has it; containerd asks the mirror for
    # /v2/library/tool/... The scope for the pod's namespace makes the mirror challenge,
    # so containerd presents the pod's grant: it must be for library/tool.
    _, policy = _policy_with_key(
        tmp_path,
        "release.pub",
        '  - match: "docker.io/**"\n'
        "    require: {cosign: {key: keys/release.pub}}\n"
        '  - match: "docker.io/**"\n'
        "    namespaces: [ml-dev]\n"
        "    mode: warn\n"
        "    require: {cosign: {key: keys/release.pub}}\n",
    )
    unsigned = push_image(
        registry.url, "library/tool", "v1", layers=[deterministic_bytes(5000, 68)]
    )
    pullgate, socket = cri_pullgate(
        tmp_path, make_pullgate, registry, containerd, name="docker.io", policy=policy
    )
    with image_service(socket) as images:
        pulled = images.PullImage(
            api_pb2.PullImageRequest(
                image=api_pb2.ImageSpec(image="tool:v1"),
                sandbox_config=api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(name="job", namespace="ml-dev")
                ),
            ),
            timeout=120,
        )
        assert pulled.image_ref.startswith("sha256:")
        listed = images.ListImages(api_pb2.ListImagesRequest(), timeout=30)
    digests = {d for image in listed.images for d in image.repo_digests}
    assert digests == {f"docker.io/library/tool@{unsigned.manifest_digest}"}
    assert "the pull grant is for" not in pullgate.log_text()
