"""The CRI ImageService in process: a fake runtime behind ``ImageServiceProxy``.

Every call other than PullImage passes through unchanged (request, response, the
runtime's status); PullImage is verified first and maps refusals and bugs to definite
gRPC codes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc import aio

from proxy.cri.gen.runtime.v1 import api_pb2, api_pb2_grpc
from proxy.cri.server import ImageServiceProxy
from proxy.oci import errors
from proxy.pipeline import Pipeline
from proxy.pipeline.access import PullGrant, PullGrants
from proxy.pipeline.gate import Pod
from proxy.upstream.auth import Credentials
from proxy.upstream.router import UpstreamRouter

IMAGE = "registry.example.test/app/web:1.0"
VERIFIED = "sha256:" + "d" * 64


class FakeRuntime(api_pb2_grpc.ImageServiceServicer):
    """containerd's ImageService, as far as the proxy can tell: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, float | None]] = []

    def _record(self, rpc: str, request: Any, context: Any) -> None:
        self.calls.append((rpc, request, context.time_remaining()))

    async def ListImages(self, request: Any, context: Any) -> Any:
        self._record("ListImages", request, context)
        return api_pb2.ListImagesResponse(
            images=[api_pb2.Image(id="sha256:aa", repo_tags=[IMAGE], size=1234)]
        )

    async def ImageStatus(self, request: Any, context: Any) -> Any:
        self._record("ImageStatus", request, context)
        return api_pb2.ImageStatusResponse(
            image=api_pb2.Image(id="sha256:bb", repo_tags=[request.image.image]),
            info={"verbose": str(request.verbose)},
        )

    async def RemoveImage(self, request: Any, context: Any) -> Any:
        self._record("RemoveImage", request, context)
        if request.image.image == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "image missing not found")
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(self, request: Any, context: Any) -> Any:
        self._record("ImageFsInfo", request, context)
        return api_pb2.ImageFsInfoResponse(
            image_filesystems=[
                api_pb2.FilesystemUsage(
                    timestamp=7, fs_id=api_pb2.FilesystemIdentifier(mountpoint="/var/lib/c")
                )
            ]
        )

    async def PullImage(self, request: Any, context: Any) -> Any:
        self._record("PullImage", request, context)
        return api_pb2.PullImageResponse(image_ref="sha256:cc")


@dataclass
class FakePipeline:
    """``Pipeline.guard`` and ``get_manifest`` only: records the credentials the pull
    acts as, and returns a verified manifest or raises ``error``."""

    error: BaseException | None = None
    asked: list[tuple[str, str]] = field(default_factory=list)
    guarded: list[tuple[str, Credentials | None]] = field(default_factory=list)
    pods: list[Pod | None] = field(default_factory=list)
    grants: PullGrants = field(default_factory=lambda: PullGrants(os.urandom(32)))
    gate: Any = field(default_factory=lambda: SimpleNamespace(pod_scoped=False))

    async def guard(
        self, route: Any, repository: str, probe: str, credentials: Any, call: Any
    ) -> Any:
        self.guarded.append((probe, credentials))
        return await call()

    async def get_manifest(
        self,
        route: Any,
        repository: str,
        reference: Any,
        *,
        front: str = "mirror",
        pod: Pod | None = None,
    ) -> Any:
        assert front == "cri"
        self.asked.append((route.registry, repository))
        self.pods.append(pod)
        if self.error is not None:
            raise self.error
        return SimpleNamespace(
            manifest=SimpleNamespace(digest=VERIFIED, is_index=False),
            verdict=SimpleNamespace(reason="cosign key verified"),
        )


class FakeRouter:
    def route(self, ns: str | None) -> Any:
        return SimpleNamespace(registry=ns)


@dataclass
class Cri:
    runtime: FakeRuntime
    pipeline: FakePipeline
    stub: Any


@pytest.fixture
async def cri() -> AsyncIterator[Cri]:
    runtime = FakeRuntime()
    runtime_server = aio.server()
    api_pb2_grpc.add_ImageServiceServicer_to_server(runtime, runtime_server)
    runtime_port = runtime_server.add_insecure_port("127.0.0.1:0")
    await runtime_server.start()
    runtime_channel = aio.insecure_channel(f"127.0.0.1:{runtime_port}")

    pipeline = FakePipeline()
    proxy = ImageServiceProxy(
        pipeline=cast(Pipeline, pipeline),
        router=lambda: cast(UpstreamRouter, FakeRouter()),
        runtime=api_pb2_grpc.ImageServiceStub(runtime_channel),
    )
    proxy_server = aio.server()
    api_pb2_grpc.add_ImageServiceServicer_to_server(proxy, proxy_server)
    proxy_port = proxy_server.add_insecure_port("127.0.0.1:0")
    await proxy_server.start()
    client_channel = aio.insecure_channel(f"127.0.0.1:{proxy_port}")
    try:
        yield Cri(runtime, pipeline, api_pb2_grpc.ImageServiceStub(client_channel))
    finally:
        await client_channel.close()
        await proxy_server.stop(grace=None)
        await runtime_channel.close()
        await runtime_server.stop(grace=None)


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("ListImages", api_pb2.ListImagesRequest(filter={"image": {"image": IMAGE}})),
        ("ImageStatus", api_pb2.ImageStatusRequest(image={"image": IMAGE}, verbose=True)),
        ("RemoveImage", api_pb2.RemoveImageRequest(image={"image": IMAGE})),
        ("ImageFsInfo", api_pb2.ImageFsInfoRequest()),
    ],
)
async def test_forwards_image_calls_unchanged_to_the_runtime(
    cri: Cri, rpc: str, request_message: Any
) -> None:
    direct = await getattr(FakeRuntime(), rpc)(
        request_message, SimpleNamespace(time_remaining=lambda: None)
    )
    response = await getattr(cri.stub, rpc)(request_message, timeout=20)
    assert response == direct
    ((called, received, remaining),) = cri.runtime.calls
    assert called == rpc
    assert received == request_message
    # The caller's deadline travels with the forwarded call (without it there would be
    # none; gRPC's deadline arithmetic may round it up a little).
    assert remaining is not None and 0 < remaining < 21
    assert cri.pipeline.asked == []


async def test_runtime_status_and_message_pass_through_unchanged(cri: Cri) -> None:
    with pytest.raises(aio.AioRpcError) as refused:
        await cri.stub.RemoveImage(api_pb2.RemoveImageRequest(image={"image": "missing"}))
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "image missing not found"


async def test_pull_is_verified_as_the_pod_then_forwarded_pinned_to_the_verified_digest(
    cri: Cri,
) -> None:
    request = api_pb2.PullImageRequest(
        image={"image": IMAGE},
        auth={"username": "u", "password": "p", "server_address": "registry.example.test"},
        sandbox_config={
            "metadata": {"name": "web-0", "namespace": "ml-dev"},
            "labels": {"team": "research"},
        },
    )
    response = await cri.stub.PullImage(request, timeout=20)
    assert response.image_ref == "sha256:cc"
    assert cri.pipeline.asked == [("registry.example.test", "app/web")]
    # Checked as the pod: its credentials, against the tag it asked for.
    assert cri.pipeline.guarded == [("manifests/1.0", Credentials("u", "p"))]
    ((called, received, _),) = cri.runtime.calls
    assert called == "PullImage"
    # containerd is asked for the digest that was verified, never the tag, which may
    # have moved upstream; the pod's credentials go along, for whichever host
    # containerd asks (pullgate's mirror).
    assert received.image.image == f"registry.example.test/app/web@{VERIFIED}"
    assert received.sandbox_config == request.sandbox_config
    # Decided for the pod's namespace; containerd's credentials for the pull are the
    # pod's grant, sealed for the mirror (for whichever host containerd asks).
    assert cri.pipeline.pods == [Pod.of("ml-dev", {"team": "research"})]
    assert received.auth.server_address == ""
    grant = cri.pipeline.grants.open(Credentials(received.auth.username, received.auth.password))
    assert grant == PullGrant(
        registry="registry.example.test",
        repository="app/web",
        digest=VERIFIED,
        pod=Pod.of("ml-dev", {"team": "research"}),
        credentials=Credentials("u", "p"),
    )


async def test_pull_credentials_come_from_the_auth_field_too(cri: Cri) -> None:
    request = api_pb2.PullImageRequest(image={"image": IMAGE}, auth={"auth": "YWxpY2U6czNjcmV0"})
    await cri.stub.PullImage(request, timeout=20)
    assert cri.pipeline.guarded == [("manifests/1.0", Credentials("alice", "s3cret"))]
    await cri.stub.PullImage(api_pb2.PullImageRequest(image={"image": IMAGE}), timeout=20)
    assert cri.pipeline.guarded[1] == ("manifests/1.0", None)


async def test_refuses_a_pull_whose_auth_field_is_not_user_and_password(cri: Cri) -> None:
    request = api_pb2.PullImageRequest(image={"image": IMAGE}, auth={"auth": "bm9jb2xvbg=="})
    with pytest.raises(aio.AioRpcError) as refused:
        await cri.stub.PullImage(request, timeout=20)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not base64 of user:password" in (refused.value.details() or "")
    assert cri.runtime.calls == []


async def test_pull_with_the_runtime_unreachable_is_unavailable() -> None:
    # Nothing listens on the runtime's port: UNAVAILABLE, never UNKNOWN.
    runtime_channel = aio.insecure_channel("127.0.0.1:1")
    proxy = ImageServiceProxy(
        pipeline=cast(Pipeline, FakePipeline()),
        router=lambda: cast(UpstreamRouter, FakeRouter()),
        runtime=api_pb2_grpc.ImageServiceStub(runtime_channel),
    )
    server = aio.server()
    api_pb2_grpc.add_ImageServiceServicer_to_server(proxy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = api_pb2_grpc.ImageServiceStub(channel)
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.PullImage(api_pb2.PullImageRequest(image={"image": IMAGE}), timeout=20)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)
        await runtime_channel.close()


async def test_refuses_pull_denied_by_policy_before_the_runtime_is_asked(cri: Cri) -> None:
    cri.pipeline.error = errors.VerificationFailed("no cosign signature verifies")
    with pytest.raises(aio.AioRpcError) as refused:
        await cri.stub.PullImage(api_pb2.PullImageRequest(image={"image": IMAGE}))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "DENIED: no cosign signature verifies"
    assert cri.runtime.calls == []


async def test_pull_with_upstream_down_is_unavailable(cri: Cri) -> None:
    cri.pipeline.error = errors.UpstreamUnavailable("cannot connect to upstream")
    with pytest.raises(aio.AioRpcError) as refused:
        await cri.stub.PullImage(api_pb2.PullImageRequest(image={"image": IMAGE}))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert cri.runtime.calls == []


async def test_internal_error_during_pull_is_grpc_internal(cri: Cri) -> None:
    # A bug is neither a refusal nor the upstream's fault, and never gRPC UNKNOWN.
    cri.pipeline.error = RuntimeError("bug in pullgate")
    with pytest.raises(aio.AioRpcError) as refused:
        await cri.stub.PullImage(api_pb2.PullImageRequest(image={"image": IMAGE}))
    assert refused.value.code() is grpc.StatusCode.INTERNAL
    details = refused.value.details()
    assert details.startswith("UNKNOWN: internal error")
    assert "bug in pullgate" not in details  # the log has it; the client gets no internals
    assert cri.runtime.calls == []


async def test_pull_grant_of_a_docker_hub_single_name_is_for_the_repository_containerd_asks(
    cri: Cri,
) -> None:
    # kubelet passes "busybox:1.36" as the pod spec has it; containerd, asked for
    # docker.io/busybox@..., asks the mirror for /v2/library/busybox/... The grant (and
    # the check as the pod) must name that repository, or the mirror refuses the grant
    # as a replay for another repository whenever it challenges (private repository,
    # scope for pods), and the pull fails.
    request = api_pb2.PullImageRequest(
        image={"image": "busybox:1.36"},
        sandbox_config={"metadata": {"name": "web-0", "namespace": "ml-dev"}},
    )
    await cri.stub.PullImage(request, timeout=20)
    assert cri.pipeline.asked == [("docker.io", "library/busybox")]
    ((_, received, _),) = cri.runtime.calls
    assert received.image.image == f"docker.io/library/busybox@{VERIFIED}"
    grant = cri.pipeline.grants.open(Credentials(received.auth.username, received.auth.password))
    assert grant is not None
    assert (grant.registry, grant.repository) == ("docker.io", "library/busybox")
