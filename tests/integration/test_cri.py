"""CRI ImageService front end with containerd's real CRI behind it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2, api_pb2_grpc
from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import MODEL_ARTIFACT, deterministic_bytes, push_image, push_model
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"


def test_cri_pull_verifies_first_and_denies_with_the_policy_reason(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    key = cs.generate_key()
    key.write_public(tmp_path / "policy" / "keys" / "release.pub")
    policy = tmp_path / "policy" / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/**"\n'
        "    require: {allOf: [{cosign: {key: keys/release.pub}}]}\n"
    )
    signed = push_image(registry.url, "cri/app", "signed", layers=[deterministic_bytes(4096, 61)])
    payload = cs.simple_signing_payload(Digest.parse(signed.manifest_digest), f"{REGISTRY}/cri/app")
    cs.push_to_registry(
        registry.url,
        "cri/app",
        cs.signature_image(Digest.parse(signed.manifest_digest), [cs.sign_layer(key, payload)]),
    )
    unsigned = push_image(
        registry.url, "cri/app", "unsigned", layers=[deterministic_bytes(4096, 62)]
    )
    socket = tmp_path / "pullgate-cri.sock"
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        policy=policy,
        extra_args=[
            "--cri-listen",
            f"unix://{socket}",
            "--cri-runtime-endpoint",
            f"unix://{containerd.socket}",
        ],
    )
    containerd.write_hosts(REGISTRY, pullgate.url)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]

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


def test_cri_refuses_an_unsigned_model_artifact_as_image_volumes_pull_it(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    # Kubernetes image volumes pull an artifact through the same PullImage call.
    key = cs.generate_key()
    key.write_public(tmp_path / "policy" / "keys" / "models.pub")
    policy = tmp_path / "policy" / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        '  - match: "registry.example.test/models/**"\n'
        f'    artifactTypes: ["{MODEL_ARTIFACT}"]\n'
        "    require: {cosign: {key: keys/models.pub}}\n"
    )
    weights = {"model.safetensors": deterministic_bytes(40_000, 63), "config.json": b"{}"}
    signed = push_model(registry.url, "models/llm", "signed", files=weights)
    payload = cs.simple_signing_payload(
        Digest.parse(signed.manifest_digest), f"{REGISTRY}/models/llm"
    )
    cs.push_to_registry(
        registry.url,
        "models/llm",
        cs.signature_image(Digest.parse(signed.manifest_digest), [cs.sign_layer(key, payload)]),
    )
    unsigned = push_model(
        registry.url,
        "models/llm",
        "unsigned",
        files={"model.safetensors": deterministic_bytes(40_000, 64)},
    )
    socket = tmp_path / "pullgate-cri.sock"
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        policy=policy,
        extra_args=[
            "--cri-listen",
            f"unix://{socket}",
            "--cri-runtime-endpoint",
            f"unix://{containerd.socket}",
        ],
    )
    containerd.write_hosts(REGISTRY, pullgate.url)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        images = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
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
