"""Mirror core with real peers: model artifacts via ctr, skopeo, ranges, faults, auth, paths."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy, corrupt_byte, cut_at
from tests.support.ocilayout import (
    deterministic_bytes,
    push_image,
    push_model,
    skopeo_copy,
    write_blob_file,
)
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def request(
    url: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def oci_error(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert isinstance(doc["errors"], list) and doc["errors"]
    error: dict[str, Any] = doc["errors"][0]
    assert error["code"] and error["message"]
    return error


def test_ctr_fetches_200mb_model_artifact_with_upstream_digests(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> None:
    weights = tmp_path / "model.safetensors"
    weights_digest = write_blob_file(weights, 200 * 1000 * 1000, seed=11)
    pushed = push_model(
        registry.url,
        "models/llm",
        "v1",
        files={"model.safetensors": weights, "tokenizer.json": b'{"vocab": {}}'},
        layer_media_type="application/vnd.cncf.model.weight.v1.raw",
    )
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url})
    containerd.write_hosts(REGISTRY, pullgate.url)
    done = containerd.ctr(
        "content", "fetch", "--plain-http", "--hosts-dir", str(containerd.certs_dir),
        f"{REGISTRY}/models/llm:v1",
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = containerd.content_digests()
    assert weights_digest in stored
    assert pushed.manifest_digest in stored
    assert set(pushed.blobs) <= stored
    assert registry.blob_gets(weights_digest) == 1  # fetched once, through pullgate


def test_skopeo_copies_image_through_pullgate(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    pushed = push_image(
        registry.url, "demo/app", "v1", layers=[deterministic_bytes(100_000, 5)] * 1
    )
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url})  # the only one: default
    destination = tmp_path / "copy"
    done = skopeo_copy(
        f"docker://{pullgate.host}/demo/app:v1",
        f"oci:{destination}:v1",
        "--src-tls-verify=false",
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((destination / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.manifest_digest
    for digest in pushed.blobs:
        blob = destination / "blobs" / "sha256" / digest.split(":", 1)[1]
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("cached", [False, True], ids=["streamed", "cache-hit"])
def test_range_requests_resume_with_the_right_bytes(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate], cached: bool
) -> None:
    data = deterministic_bytes(3 * 1024 * 1024 + 17, seed=21)
    pushed = push_image(registry.url, "demo/range", "v1", layers=[data])
    layer = pushed.layer_digests[0]
    size = pushed.blobs[layer]
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache" if cached else None
    )
    path = f"/v2/demo/range/blobs/{layer}?ns={REGISTRY}"
    status, _, full = request(pullgate.url, path)
    assert status == 200 and "sha256:" + hashlib.sha256(full).hexdigest() == layer
    for header, start, end in [
        (f"bytes={size // 2}-", size // 2, size - 1),
        ("bytes=100-199", 100, 199),
        (f"bytes={size - 1}-", size - 1, size - 1),
    ]:
        status, headers, body = request(pullgate.url, path, headers={"Range": header})
        assert status == 206, header
        assert headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert body == full[start : end + 1]
    status, headers, body = request(pullgate.url, path, headers={"Range": f"bytes={size}-"})
    assert status == 416
    assert oci_error(body)["code"] == "RANGE_INVALID"


@pytest.mark.parametrize(
    ("fault", "metric"),
    [
        (corrupt_byte(1_000_000), "pullgate_blob_digest_mismatch_total"),
        (cut_at(1_500_000), "pullgate_upstream_truncated_total"),
    ],
    ids=["corrupted-byte", "cut-stream"],
)
def test_client_never_receives_complete_body_on_corruption_or_truncation(
    tmp_path: Path,
    registry: Registry,
    make_pullgate: Callable[..., Pullgate],
    fault: Any,
    metric: str,
) -> None:
    data = deterministic_bytes(2 * 1024 * 1024, seed=31)
    pushed = push_image(registry.url, "demo/faulty", "v1", layers=[data])
    layer = pushed.layer_digests[0]
    faults = FaultProxy(registry.url).start()
    try:
        pullgate = make_pullgate(upstreams={REGISTRY: faults.url})
        faults.set_fault(layer, fault)
        before = pullgate.metrics().get(metric, 0.0)
        host, port = pullgate.host.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", f"/v2/demo/faulty/blobs/{layer}?ns={REGISTRY}")
        response = conn.getresponse()
        assert response.status == 200  # headers went out before the fault
        promised = int(response.headers["Content-Length"])
        received = 0
        try:
            while chunk := response.read(65536):
                received += len(chunk)
        except (http.client.IncompleteRead, ConnectionError):
            pass  # the connection was aborted: what must happen
        conn.close()
        assert received < promised, "a complete body went out despite the fault"
        deadline = time.monotonic() + 10
        while pullgate.metrics().get(metric, 0.0) <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pullgate.metrics().get(metric, 0.0) == before + 1
        assert layer in pullgate.log_text()
        # The service is fine: the next request, without the fault, is served whole.
        faults.clear()
        status, _, body = request(pullgate.url, f"/v2/demo/faulty/blobs/{layer}?ns={REGISTRY}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
    finally:
        faults.stop()


def test_private_repository_with_node_credentials_and_without(
    tmp_path: Path, make_pullgate: Callable[..., Pullgate]
) -> None:
    open_registry = Registry(tmp_path / "private").start()
    try:
        pushed = push_image(
            open_registry.url, "team/secret", "v1", layers=[deterministic_bytes(50_000, 41)]
        )
    finally:
        open_registry.stop()
    private = Registry(
        tmp_path / "private", htpasswd={"alice": "s3cret"}, port=open_registry.port
    ).start()
    try:
        assert request(private.url, "/v2/team/secret/manifests/v1")[0] == 401
        config = tmp_path / "docker-config.json"
        auth = base64.b64encode(b"alice:s3cret").decode()
        config.write_text(json.dumps({"auths": {private.host: {"auth": auth}}}))
        with_creds = make_pullgate(
            upstreams={REGISTRY: private.url}, extra_args=["--docker-config", str(config)]
        )
        status, headers, body = request(
            with_creds.url,
            f"/v2/team/secret/manifests/v1?ns={REGISTRY}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert status == 200
        assert headers["docker-content-digest"] == pushed.manifest_digest
        layer = pushed.layer_digests[0]
        status, _, blob = request(with_creds.url, f"/v2/team/secret/blobs/{layer}?ns={REGISTRY}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == layer

        without = make_pullgate(upstreams={REGISTRY: private.url})
        status, _, body = request(
            without.url,
            f"/v2/team/secret/manifests/v1?ns={REGISTRY}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert status in (401, 403)
        assert oci_error(body)["code"] in ("UNAUTHORIZED", "DENIED")
    finally:
        private.stop()


def test_manifest_by_tag_carries_the_digest_of_the_bytes_served(
    registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    pushed = push_image(registry.url, "demo/tag", "v1", layers=[b"x" * 1000])
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url})
    for method in ("HEAD", "GET"):
        status, headers, body = request(
            pullgate.url,
            f"/v2/demo/tag/manifests/v1?ns={REGISTRY}",
            method=method,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert status == 200
        assert headers["docker-content-digest"] == pushed.manifest_digest
        assert headers.get("oci-namespace") == REGISTRY
        if method == "GET":
            assert "sha256:" + hashlib.sha256(body).hexdigest() == pushed.manifest_digest


HOSTILE_PATHS = [
    "/v2/demo/../etc/manifests/v1",
    "/v2/demo/%2e%2e/manifests/v1",
    "/v2/demo/%2E%2E/blobs/sha256:" + "a" * 64,
    "/v2/" + "a/" * 600 + "manifests/v1",
    "/v2/" + "x" * 300 + "/manifests/v1",
    "/v2/demo/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
    "/v2/demo/app/blobs/sha256:XYZ",
    "/v2/demo/app/blobs/sha256:" + "a" * 63,
    "/v2/demo/app/manifests/-bad-tag",
    "/v2/demo/app/manifests/" + "t" * 200,
    "/v2/Demo/App/manifests/v1",
    "/v2/demo//app/manifests/v1",
]


def test_refuses_hostile_paths_with_400_oci_errors(
    registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url})
    for path in HOSTILE_PATHS:
        status, _, body = request(pullgate.url, path + f"?ns={REGISTRY}")
        assert status == 400, path
        assert oci_error(body)["code"] in (
            "NAME_INVALID",
            "DIGEST_INVALID",
            "MANIFEST_INVALID",
            "TAG_INVALID",
            "UNSUPPORTED",
        ), path
    assert registry.access_log() == [e for e in registry.access_log() if "/.." not in e.path]


def test_refuses_writes_with_405_unsupported(
    registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url})
    assert request(pullgate.url, "/v2/")[0] == 200
    for method, path in [
        ("POST", "/v2/demo/app/blobs/uploads/"),
        ("PUT", "/v2/demo/app/manifests/v1"),
        ("PATCH", "/v2/demo/app/blobs/uploads/x"),
        ("DELETE", "/v2/demo/app/manifests/sha256:" + "a" * 64),
    ]:
        status, _, body = request(pullgate.url, path, method=method)
        assert status == 405, (method, path)
        assert oci_error(body)["code"] == "UNSUPPORTED"
    writes = [e for e in registry.access_log() if e.method in ("POST", "PUT", "PATCH", "DELETE")]
    assert writes == []
