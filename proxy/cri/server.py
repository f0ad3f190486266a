"""CRI ImageService front end: kubelet's image endpoint, in front of containerd.

A thin shell, like ``proxy/http``. ``PullImage`` first resolves and verifies the
image's manifest through the same pipeline the HTTP mirror uses, as the pod (its pull
secret, for private repositories: ``proxy.pipeline.access``), so a refusal reaches
kubelet (and the pod's events) as ``PERMISSION_DENIED``/``UNAUTHENTICATED`` with the
reason, before containerd starts. An allowed pull is forwarded to containerd pinned to
the verified digest; containerd fetches through pullgate's HTTP mirror (its hosts.toml
points there), where every manifest and blob is checked again: the CRI check gives the
clear early answer, the mirror stays the enforcement point. Every other ImageService
call is forwarded as is."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc import aio

from proxy.cri.gen.runtime.v1 import api_pb2, api_pb2_grpc
from proxy.oci import errors
from proxy.oci.manifest import Manifest
from proxy.oci.reference import ImageReference, ManifestRef, upstream_repository
from proxy.pipeline import Pipeline
from proxy.pipeline.access import PullGrant
from proxy.pipeline.gate import Pod
from proxy.pipeline.manifests import ServedManifest
from proxy.pipeline.walk import IndexWalk
from proxy.upstream.auth import Credentials, credentials_from_parts
from proxy.upstream.router import Route, UpstreamRouter

log = logging.getLogger("pullgate.cri")

Context: TypeAlias = aio.ServicerContext[Any, Any]
ResponseT = TypeVar("ResponseT")

# The gRPC side of the one error table: each HTTP status the OCI errors are bound to
# has one gRPC code. Nothing maps to UNKNOWN; only a bug (``InternalError``, 500) is
# INTERNAL.
GRPC_CODE_FOR_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    416: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# Indexes in indexes that a pull for a pod may go through (containerd follows them).
MAX_INDEX_DEPTH = 2


def grpc_code_for(error: errors.OCIError) -> grpc.StatusCode:
    return GRPC_CODE_FOR_STATUS.get(error.status, grpc.StatusCode.INTERNAL)


def _forwarded(
    rpc: str, response_type: type[ResponseT]
) -> Callable[[ImageServiceProxy, object, Context], Coroutine[Any, Any, ResponseT]]:
    """An ImageService method that passes its request unchanged to the runtime's ``rpc``."""

    async def forward(self: ImageServiceProxy, request: object, context: Context) -> ResponseT:
        return await self.forward(rpc, request, context, response_type)

    forward.__name__ = rpc
    forward.__qualname__ = f"ImageServiceProxy.{rpc}"
    forward.__doc__ = f"``{rpc}``, forwarded to the runtime as is."
    return forward


class ImageServiceProxy(api_pb2_grpc.ImageServiceServicer):
    """Verifies before pulling; forwards everything else to the runtime's ImageService."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        router: Callable[[], UpstreamRouter],
        runtime: api_pb2_grpc.ImageServiceStub,
    ) -> None:
        self._pipeline = pipeline
        self._router = router
        self._runtime = runtime

    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: Context
    ) -> api_pb2.PullImageResponse:
        image = request.image.image
        who = _pod_of(request)
        pod = _pod_context(request)
        try:
            # 1. Parse as kubelet sends it: docker.io names may omit the registry.
            reference = ImageReference.parse(image)
            credentials = _credentials_of(request)
            # 2. Resolve and verify through the one pipeline (the same verdict cache),
            #    as the pod: a private repository needs the pod's own pull secret,
            #    checked upstream even when everything is cached.
            route = self._router().route(reference.registry)
            # The repository as containerd will ask the mirror for it ("busybox" is
            # library/busybox on Docker Hub): the grant is bound to it.
            repository = upstream_repository(route.registry, reference.repository)
            ref = reference.reference
            served = await self._pipeline.guard(
                route,
                repository,
                f"manifests/{ref}",
                credentials,
                lambda: self._verify(route, repository, ref, pod),
            )
        except errors.OCIError as exc:
            log.warning(
                "CRI PullImage %s for %s refused: %s %s", image[:300], who, exc.code, exc.message
            )
            await context.abort(grpc_code_for(exc), f"{exc.code}: {exc.message}")
        except Exception:
            # A bug, not a refusal: INTERNAL (never PERMISSION_DENIED or UNAVAILABLE).
            log.exception("CRI PullImage %s: internal error", image[:300])
            internal = errors.InternalError("internal error while verifying; see pullgate's log")
            await context.abort(grpc_code_for(internal), f"{internal.code}: {internal.message}")
        digest = served.manifest.digest
        log.info(
            "CRI PullImage %s for %s verified as %s (%s); pulling through containerd",
            image[:300],
            who,
            digest,
            served.verdict.reason,
        )
        # 3. containerd pulls through the mirror, which checks every byte again. It is
        #    asked for the verified digest, not the tag: a tag moved upstream meanwhile
        #    cannot hand it another manifest. Its credentials for the pull are the
        #    pod's grant, sealed for the mirror: the pod (for scopes for pods)
        #    and the pod's own credentials. With ``server_address`` empty, containerd
        #    offers them to the hosts its hosts.toml names for the registry (pullgate).
        grant = self._pipeline.grants.seal(
            PullGrant(
                registry=route.registry,
                repository=repository,
                digest=str(digest),
                pod=pod,
                credentials=credentials,
            )
        )
        forwarded = api_pb2.PullImageRequest()
        forwarded.CopyFrom(request)
        forwarded.image.image = f"{reference.registry}/{repository}@{digest}"
        forwarded.auth.CopyFrom(
            api_pb2.AuthConfig(username=grant.username, password=grant.password)
        )
        return await self.forward("PullImage", forwarded, context, api_pb2.PullImageResponse)

    async def _verify(
        self, route: Route, repository: str, ref: ManifestRef, pod: Pod | None
    ) -> ServedManifest:
        """The manifest, decided for ``pod``; and, where scopes for pods apply, each
        child of an index too.

        containerd presents the pod's grant only after a challenge, and the mirror
        challenges only where its answer without a pod is no: where that answer is yes
        (a lenient scope for everyone, a stricter one for the pod), containerd's pull of
        a child is decided without the pod. So the pod's scope decides the children
        here, before containerd is asked, as a pull of each would be decided.
        """
        served = await self._pipeline.get_manifest(route, repository, ref, front="cri", pod=pod)
        if pod is not None and self._pipeline.gate.pod_scoped:
            await self._children_for(route, repository, served.manifest, pod, depth=1)
        return served

    async def _children_for(
        self, route: Route, repository: str, index: Manifest, pod: Pod, *, depth: int
    ) -> None:
        """Decide ``index``'s children (and theirs, for a nested index) for ``pod``."""
        if not index.is_index:
            return
        name = f"{route.registry}/{repository}@{index.digest}"
        walk = IndexWalk(_ForPod(self._pipeline, pod), route, repository, index)
        if walk.not_checked or depth > MAX_INDEX_DEPTH:
            raise errors.Denied(
                f"{name}: an index of more than {len(walk.checked)} children, or nested "
                f"deeper than {MAX_INDEX_DEPTH}, cannot be decided for the pod's scope"
            )
        async for child in walk:
            if child.attestation:
                continue  # never pulled as a platform, whatever became of it
            if isinstance(child.error, errors.Denied):
                raise errors.Denied(
                    f"{child.error.message} (a child of the index {name}, decided for the pod)",
                    detail=child.error.detail,
                ) from None
            # Not fetched: its error, as the pull would meet it.
            await self._children_for(
                route, repository, child.result().manifest, pod, depth=depth + 1
            )

    # Every other ImageService call passes through unchanged.
    ListImages = _forwarded("ListImages", api_pb2.ListImagesResponse)
    ImageStatus = _forwarded("ImageStatus", api_pb2.ImageStatusResponse)
    RemoveImage = _forwarded("RemoveImage", api_pb2.RemoveImageResponse)
    ImageFsInfo = _forwarded("ImageFsInfo", api_pb2.ImageFsInfoResponse)

    async def forward(
        self, rpc: str, request: object, context: Context, response_type: type[ResponseT]
    ) -> ResponseT:
        """Call the runtime's ``rpc`` with ``request`` within the caller's deadline.

        The runtime's own status and message pass through unchanged.
        """
        method = getattr(self._runtime, rpc)
        try:
            response: ResponseT = await method(request, timeout=context.time_remaining())
        except aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "runtime error")
        return response


class _ForPod:
    """The pipeline's manifests as one pod's pull through the CRI gets them."""

    def __init__(self, pipeline: Pipeline, pod: Pod) -> None:
        self._pipeline = pipeline
        self._pod = pod

    async def get_manifest(
        self, route: Route, repository: str, ref: ManifestRef, *, accept: str | None = None
    ) -> ServedManifest:
        return await self._pipeline.get_manifest(
            route, repository, ref, accept=accept, front="cri", pod=self._pod
        )


def _credentials_of(request: api_pb2.PullImageRequest) -> Credentials | None:
    """The pod's pull secret for this image, as kubelet hands it over."""
    if not request.HasField("auth"):
        return None
    auth = request.auth
    try:
        return credentials_from_parts(
            username=auth.username,
            password=auth.password,
            auth=auth.auth,
            identity_token=auth.identity_token,
            registry_token=auth.registry_token,
        )
    except ValueError as exc:
        raise errors.CredentialsRequired(f"the pull's credentials are unusable: {exc}") from None


def _pod_context(request: api_pb2.PullImageRequest) -> Pod | None:
    """The pod the pull is for (namespace and labels), if kubelet said."""
    if not request.HasField("sandbox_config"):
        return None
    config = request.sandbox_config
    if not config.metadata.namespace:
        return None
    return Pod.of(config.metadata.namespace, dict(config.labels))


def _pod_of(request: api_pb2.PullImageRequest) -> str:
    """``namespace/name`` of the pod the pull is for, for logs ("-" if none given)."""
    if not request.HasField("sandbox_config"):
        return "-"
    metadata = request.sandbox_config.metadata
    return f"{metadata.namespace or '-'}/{metadata.name or '-'}"


async def start_cri_server(
    *,
    listen: str,
    runtime_endpoint: str,
    pipeline: Pipeline,
    router: Callable[[], UpstreamRouter],
) -> tuple[aio.Server, aio.Channel]:
    """Start the ImageService on ``listen`` (e.g. ``unix:///run/pullgate/cri.sock``)."""
    channel = aio.insecure_channel(runtime_endpoint)
    server = aio.server()
    api_pb2_grpc.add_ImageServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ImageServiceProxy(
            pipeline=pipeline,
            router=router,
            runtime=api_pb2_grpc.ImageServiceStub(channel),  # type: ignore[no-untyped-call]
        ),
        server,
    )
    server.add_insecure_port(listen)
    await server.start()
    log.info("CRI ImageService on %s, runtime %s", listen, runtime_endpoint)
    return server, channel
