"""Private repositories: the requester's own credentials decide, even on a cache hit.

A real ``docker-registry`` with htpasswd auth (every repository private; the node has
no credentials for it), containerd's real CRI behind pullgate's ImageService, and
``ctr --user`` through the mirror.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2
from tests.support.cri import cri_pullgate, image_service
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_image
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "private.example.test"
IMAGE = f"{REGISTRY}/team/secret:v1"
RIGHT = ("alice", "s3cret")
WRONG = ("alice", "guess")


@dataclass
class Private:
    registry: Registry
    pushed: PushedArtifact
    pullgate: Pullgate
    containerd: Containerd
    cri_socket: Path


@pytest.fixture
def private(
    tmp_path: Path, containerd: Containerd, make_pullgate: Callable[..., Pullgate]
) -> Iterator[Private]:
    # Pushed while open, then served with htpasswd auth from the same storage.
    open_registry = Registry(tmp_path / "private").start()
    try:
        pushed = push_image(
            open_registry.url,
            "team/secret",
            "v1",
            layers=[deterministic_bytes(300_000, 71), deterministic_bytes(5000, 72)],
        )
    finally:
        open_registry.stop()
    registry = Registry(
        tmp_path / "private", htpasswd=dict([RIGHT]), port=open_registry.port
    ).start()
    try:
        pullgate, socket = cri_pullgate(
            tmp_path,
            make_pullgate,
            registry,
            containerd,
            name=REGISTRY,
            cache_dir=tmp_path / "cache",
        )
        yield Private(registry, pushed, pullgate, containerd, socket)
    finally:
        registry.stop()


def _pull(private: Private, credentials: tuple[str, str] | None) -> tuple[grpc.StatusCode, str]:
    auth = None
    if credentials is not None:
        # As kubelet sends a pull secret: the registry it is for, user and password.
        auth = api_pb2.AuthConfig(
            username=credentials[0], password=credentials[1], server_address=REGISTRY
        )
    with image_service(private.cri_socket) as images:
        try:
            pulled = images.PullImage(
                api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=IMAGE),
                    auth=auth,
                    sandbox_config=api_pb2.PodSandboxConfig(
                        metadata=api_pb2.PodSandboxMetadata(name="job-0", namespace="ml-dev")
                    ),
                ),
                timeout=120,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, pulled.image_ref


def _mirror_get(
    private: Private, path: str, credentials: tuple[str, str] | None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": private.pushed.media_type}
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(f"{private.pullgate.url}{path}?ns={REGISTRY}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _error(body: bytes) -> tuple[str, str]:
    (entry,) = json.loads(body)["errors"]
    return entry["code"], entry["message"]


def _cri_content(containerd: Containerd) -> set[str]:
    """What containerd's CRI (namespace k8s.io) holds."""
    done = subprocess.run(
        ["ctr", "--address", str(containerd.socket), "-n", "k8s.io", "content", "ls", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def _credential_checks(registry: Registry, status: int) -> int:
    """HEADs of the image's manifest by tag that the registry answered ``status``."""
    return sum(
        1
        for entry in registry.access_log()
        if entry.method == "HEAD"
        and entry.path == "/v2/team/secret/manifests/v1"
        and entry.status == status
    )


def _assert_refusals(private: Private) -> None:
    code, details = _pull(private, None)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert f"{REGISTRY}/team/secret is private" in details
    assert "carried no credentials" in details
    code, details = _pull(private, WRONG)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "refused the request's credentials" in details


def test_cri_refuses_a_private_image_to_a_pod_without_or_with_wrong_credentials_even_when_cached(
    private: Private,
) -> None:
    _assert_refusals(private)
    assert _cri_content(private.containerd) == set()

    code, image_ref = _pull(private, RIGHT)
    assert code is grpc.StatusCode.OK and image_ref.startswith("sha256:")
    assert set(private.pushed.layer_digests) <= _cri_content(private.containerd)
    # Every blob is in pullgate's cache now, fetched once, as the pod.
    assert all(private.registry.blob_gets(blob) == 1 for blob in private.pushed.layer_digests)

    # The refusals hold with everything cached: each is checked against the upstream.
    before = _credential_checks(private.registry, 401)
    _assert_refusals(private)
    assert _credential_checks(private.registry, 401) > before, "wrong credentials checked"
    # The registry saw the authenticated check of the right credentials.
    assert _credential_checks(private.registry, 200) >= 1
    # The right credentials pull again (content already in containerd, pinned digest).
    assert _pull(private, RIGHT) == (grpc.StatusCode.OK, image_ref)


def test_mirror_refuses_cached_private_blobs_to_a_request_without_or_with_wrong_credentials(
    private: Private,
) -> None:
    manifest_path = "/v2/team/secret/manifests/v1"
    status, headers, body = _mirror_get(private, manifest_path, None)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="pullgate"')
    assert _error(body)[0] == "UNAUTHORIZED" and "is private" in _error(body)[1]

    status, _, body = _mirror_get(private, manifest_path, RIGHT)
    assert status == 200 and body == private.pushed.manifest_bytes
    layer = private.pushed.layer_digests[0]
    blob_path = f"/v2/team/secret/blobs/{layer}"
    status, _, blob = _mirror_get(private, blob_path, RIGHT)
    assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == layer

    # Cached now; still refused without credentials, and with wrong ones.
    status, headers, body = _mirror_get(private, blob_path, None)
    assert status == 401 and _error(body)[0] == "UNAUTHORIZED"
    assert "WWW-Authenticate" in headers
    status, _, body = _mirror_get(private, blob_path, WRONG)
    assert status == 403
    code, message = _error(body)
    assert code == "DENIED" and "refused the request's credentials" in message
    assert private.registry.blob_gets(layer) == 1


def test_ctr_pull_through_the_mirror_needs_credentials_the_upstream_accepts(
    private: Private,
) -> None:
    ctr = private.containerd

    def pull(*user: str) -> tuple[int, str]:
        done = ctr.ctr(
            "images", "pull", "--plain-http", "--hosts-dir", str(ctr.certs_dir),
            *user, IMAGE, check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    code, output = pull()
    assert code != 0 and ("401" in output or "unauthorized" in output.lower()), output
    code, output = pull("--user", ":".join(WRONG))
    assert code != 0 and ("403" in output or "denied" in output.lower()), output
    assert ctr.content_digests() == set()
    code, output = pull("--user", ":".join(RIGHT))
    assert code == 0, output
    assert set(private.pushed.layer_digests) <= ctr.content_digests()
    # Cached in pullgate now: still refused without credentials, or with wrong ones.
    ctr.ctr("images", "rm", IMAGE)
    ctr.ctr("content", "prune", "references", check=False)
    for blob in private.pushed.blobs:
        ctr.ctr("content", "rm", blob, check=False)
    assert pull()[0] != 0
    assert pull("--user", ":".join(WRONG))[0] != 0
    assert not set(private.pushed.layer_digests) & ctr.content_digests()


def test_cri_pull_for_a_pod_with_many_labels_and_a_long_token_reaches_the_mirror(
    private: Private,
) -> None:
    # The pod's grant carries its labels and its credentials (cloud registry tokens run
    # to kilobytes) twice base64'd in containerd's Authorization header: more than
    # aiohttp's default 8 KiB for one header, which it answered with a bare 400 that
    # failed the pull. Kubernetes allows 63-character label values.
    labels = {f"example.test/label-{i:02d}": "v" * 63 for i in range(64)}
    auth = api_pb2.AuthConfig(username=RIGHT[0], password=RIGHT[1], server_address=REGISTRY)
    with image_service(private.cri_socket) as images:
        pulled = images.PullImage(
            api_pb2.PullImageRequest(
                image=api_pb2.ImageSpec(image=IMAGE),
                auth=auth,
                sandbox_config=api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(name="job-1", namespace="ml-dev"),
                    labels=labels,
                ),
            ),
            timeout=120,
        )
    assert pulled.image_ref.startswith("sha256:")
    assert set(private.pushed.layer_digests) <= _cri_content(private.containerd)


def test_refuses_prefetch_of_a_cached_private_image_without_credentials(
    private: Private,
) -> None:
    # The admin listener's prefetch acts as the node: it must not tell anyone on the
    # node what a private repository holds in the cache (manifests, verdicts, blobs).
    code, _ = _pull(private, RIGHT)
    assert code is grpc.StatusCode.OK
    ref = f"{REGISTRY}/team/secret@{private.pushed.manifest_digest}"
    request = urllib.request.Request(
        f"{private.pullgate.admin_url}/admin/prefetch",
        data=json.dumps({"references": [ref]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    kinds = [event["kind"] for event in events]
    assert "manifest" not in kinds and "done" not in kinds, events
    assert events[-1] == {"kind": "summary", "ok": False, "references": 1}
    assert any("is private" in event.get("message", "") for event in events), events
