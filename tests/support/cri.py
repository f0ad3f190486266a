"""pullgate's CRI front end in front of a real containerd, as the CRI tests set it up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from proxy.cri.gen.runtime.v1 import api_pb2_grpc
from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import PushedArtifact
from tests.support.peers import Containerd, Pullgate, Registry


def cri_pullgate(
    tmp_path: Path,
    make_pullgate: Callable[..., Pullgate],
    registry: Registry,
    containerd: Containerd,
    *,
    name: str,
    runtime: str | None = None,
    **kwargs: Any,
) -> tuple[Pullgate, Path]:
    """pullgate mirroring ``name`` from ``registry``, with its CRI socket in front of
    ``runtime`` (containerd's own socket by default), and containerd's hosts.toml for
    ``name`` pointing at the mirror. Returns pullgate and its CRI socket."""
    socket = tmp_path / "pullgate-cri.sock"
    pullgate = make_pullgate(
        upstreams={name: registry.url},
        extra_args=[
            "--cri-listen",
            f"unix://{socket}",
            "--cri-runtime-endpoint",
            runtime or f"unix://{containerd.socket}",
        ],
        **kwargs,
    )
    containerd.write_hosts(name, pullgate.url)
    return pullgate, socket


@contextmanager
def image_service(socket: Path) -> Iterator[Any]:
    """A blocking ImageService client on pullgate's CRI socket."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        yield api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]


def sign_image(registry: Registry, key: cs.TestKey, name: str, pushed: PushedArtifact) -> None:
    """A cosign signature of ``pushed`` (as ``name/<repository>``) with ``key``."""
    digest = Digest.parse(pushed.manifest_digest)
    payload = cs.simple_signing_payload(digest, f"{name}/{pushed.repository}")
    cs.push_to_registry(
        registry.url, pushed.repository, cs.signature_image(digest, [cs.sign_layer(key, payload)])
    )
