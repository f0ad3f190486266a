"""The HTTP front end in process: aiohttp's test client against the app wired as
``serve`` wires it, in front of a fake upstream registry on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.http import app as app_module
from proxy.oci.digest import Digest
from proxy.pipeline.access import PullGrant
from proxy.pipeline.gate import Pod
from proxy.upstream.auth import Credentials
from tests.support.inprocess import (
    ALLOW_APP_POLICY,
    REGISTRY,
    FakeRegistry,
    Image,
    Mirror,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)
from tests.support.peers import free_port

# Big enough to cross many upstream writes and the fill's first batches.
LAYER = bytes((i * 7 + i // 251) & 0xFF for i in range(1024 * 1024 + 123))


@pytest.fixture
def upstream() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def image(upstream: FakeRegistry) -> Image:
    return upstream.add_image("app/web", "1.0", LAYER, b"second layer")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_APP_POLICY)
    return path


@pytest.fixture
async def mirror(upstream: FakeRegistry, image: Image, policy_file: Path) -> AsyncIterator[Mirror]:
    """No cache: every blob is streamed from the upstream."""
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy_file)) as running,
    ):
        yield running


@pytest.fixture(params=["uncached", "cached"])
async def either_mirror(
    request: pytest.FixtureRequest,
    upstream: FakeRegistry,
    image: Image,
    policy_file: Path,
    tmp_path: Path,
) -> AsyncIterator[Mirror]:
    """Without a cache (a verifying stream) and with one (a single-flight fill)."""
    cache_dir = tmp_path / "cache" if request.param == "cached" else None
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy_file, cache_dir=cache_dir)) as running,
    ):
        yield running


async def _oci_error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    doc = await response.json()
    ((error,),) = (doc["errors"],)
    assert set(error) <= {"code", "message", "detail"}
    return dict(error)


async def _pull_manifest(mirror: Mirror, image: Image) -> None:
    response = await mirror.client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 200


# ---- manifests ---------------------------------------------------------------------


async def test_serves_manifest_with_exact_bytes_and_docker_content_digest(
    mirror: Mirror, image: Image
) -> None:
    for ref in (image.tag, str(image.digest)):
        response = await mirror.client.get(f"/v2/app/web/manifests/{ref}")
        assert response.status == 200
        assert await response.read() == image.manifest
        assert response.headers["Docker-Content-Digest"] == str(image.digest)
        assert response.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    head = await mirror.client.head("/v2/app/web/manifests/1.0")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert head.headers["Docker-Content-Digest"] == str(image.digest)


async def test_refuses_manifest_no_policy_scope_allows(
    mirror: Mirror, upstream: FakeRegistry
) -> None:
    upstream.add_image("other/tool", "2", b"tool layer")
    response = await mirror.client.get("/v2/other/tool/manifests/2")
    assert response.status == 403
    error = await _oci_error(response)
    assert error["code"] == "DENIED"
    assert "no policy scope matches" in error["message"]


async def test_refuses_pull_grant_replayed_for_another_repository(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    """A grant is containerd's pull for one pod of one repository: presented for another
    repository it is a replay, not a pull (it carries the pod's credentials)."""
    other = upstream.add_image("app/api", "1.0", b"api layer")
    grant = PullGrant(
        registry=mirror.route().registry,
        repository="app/web",
        digest=str(image.digest),
        pod=Pod("ml-dev", ()),
        credentials=Credentials("pod-user", "s3cret"),
    )
    sealed = mirror.pipeline.grants.seal(grant)
    basic = base64.b64encode(f"{sealed.username}:{sealed.password}".encode()).decode()
    auth = {"Authorization": f"Basic {basic}"}
    granted = await mirror.client.get(f"/v2/app/web/manifests/{image.digest}", headers=auth)
    assert granted.status == 200 and await granted.read() == image.manifest
    for path in (f"/v2/app/api/manifests/{other.tag}", f"/v2/app/api/blobs/{other.config}"):
        response = await mirror.client.get(path, headers=auth)
        assert response.status == 403, path
        error = await _oci_error(response)
        assert error["code"] == "DENIED"
        assert "pull grant is for" in error["message"] and "app/web" in error["message"]


# ---- blobs -------------------------------------------------------------------------


async def test_refuses_blob_without_a_verified_manifest(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    response = await mirror.client.get(f"/v2/app/web/blobs/{image.layers[0]}")
    assert response.status == 403
    error = await _oci_error(response)
    assert error["code"] == "DENIED"
    assert str(image.layers[0]) in error["message"]
    assert "not referenced by any verified manifest" in error["message"]
    # Refused before anything was asked of the upstream.
    assert upstream.requests_for("blobs") == []


async def test_refuses_ns_registry_with_a_trailing_newline(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    """``ns=registry.example.test%0A`` was a registry of its own (its own allowances,
    outside the policy's scopes for the name), not a malformed name."""
    for path in ("manifests/1.0", f"blobs/{image.layers[0]}"):
        response = await mirror.client.get(f"/v2/app/web/{path}?ns={REGISTRY}%0A")
        assert response.status == 400
        error = await _oci_error(response)
        assert error["code"] == "NAME_INVALID"
        assert "invalid registry name" in error["message"]
    assert upstream.requests_for("manifests") == []


async def test_refuses_to_treat_ns_with_the_https_port_as_another_registry(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    """``ns=registry.example.test:443`` is the configured registry, under its policy
    scopes and allowances, not an unlisted one reached directly."""
    response = await mirror.client.get(f"/v2/app/web/manifests/1.0?ns={REGISTRY}:443")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == str(image.digest)
    assert response.headers["OCI-Namespace"] == REGISTRY
    upstream.add_image("other/tool", "2", b"tool layer")
    refused = await mirror.client.get(f"/v2/other/tool/manifests/2?ns={REGISTRY}:443")
    assert refused.status == 403
    assert "no policy scope matches" in (await _oci_error(refused))["message"]


async def test_refuses_blob_verified_for_another_repository(
    mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    upstream.add_image("app/other", "1.0", LAYER)
    await _pull_manifest(mirror, image)
    response = await mirror.client.get(f"/v2/app/other/blobs/{image.layers[0]}")
    assert response.status == 403
    assert (await _oci_error(response))["code"] == "DENIED"


async def test_streams_blob_of_a_verified_manifest_with_the_right_bytes(
    either_mirror: Mirror, image: Image
) -> None:
    mirror = either_mirror
    await _pull_manifest(mirror, image)
    layer = image.layers[0]
    response = await mirror.client.get(f"/v2/app/web/blobs/{layer}")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == str(layer)
    assert response.headers["Content-Length"] == str(len(LAYER))
    assert await response.read() == LAYER
    kept = mirror.pipeline.store.path_of(layer)
    assert (kept is not None) == mirror.pipeline.store.caching
    ranged = await mirror.client.get(
        f"/v2/app/web/blobs/{layer}", headers={"Range": "bytes=1000-70999"}
    )
    assert ranged.status == 206
    assert ranged.headers["Content-Range"] == f"bytes 1000-70999/{len(LAYER)}"
    assert await ranged.read() == LAYER[1000:71000]


async def test_refuses_to_deliver_a_corrupted_blob_complete(
    either_mirror: Mirror, upstream: FakeRegistry, image: Image
) -> None:
    mirror = either_mirror
    layer = image.layers[0]
    upstream.corrupt.add(layer)
    await _pull_manifest(mirror, image)
    response = await mirror.client.get(f"/v2/app/web/blobs/{layer}")
    # Headers went out before the digest could be known ...
    assert response.status == 200
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in response.content.iter_any():
            received += piece
    # ... but the connection was cut before the last bytes: never a complete body,
    # and nothing kept.
    assert len(received) < len(LAYER)
    assert Digest.of(bytes(received)) != layer
    assert mirror.pipeline.store.path_of(layer) is None
    mismatches = mirror.metrics.registry.get_sample_value(
        "pullgate_blob_digest_mismatch_total", {"registry": REGISTRY}
    )
    assert mismatches == 1


# ---- tags --------------------------------------------------------------------------


async def test_tags_query_reaches_upstream_as_one_escaped_parameter(
    mirror: Mirror, upstream: FakeRegistry
) -> None:
    # ``last=a%26x%3D1`` is one parameter whose value is "a&x=1"; unknown parameters are
    # not forwarded.
    url = URL("/v2/app/web/tags/list?n=10&last=a%26x%3D1&evil=1", encoded=True)
    response = await mirror.client.get(url)
    assert response.status == 200
    assert (await response.json())["tags"] == ["1.0"]
    (seen,) = upstream.requests_for("tags/list")
    assert seen.query == {"n": "10", "last": "a&x=1"}
    assert seen.query_string == "n=10&last=a%26x%3D1"


# ---- errors ------------------------------------------------------------------------


async def test_internal_error_is_500_unknown_not_blamed_on_the_upstream(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("secret internal detail")

    monkeypatch.setattr(mirror.pipeline, "get_manifest", broken)
    with caplog.at_level(logging.ERROR, logger="pullgate.http"):
        response = await mirror.client.get("/v2/app/web/manifests/1.0")
    assert response.status == 500
    error = await _oci_error(response)
    assert error["code"] == "UNKNOWN"
    assert "internal error" in error["message"]
    assert "secret internal detail" not in await response.text()
    (record,) = [r for r in caplog.records if r.name == "pullgate.http"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)
    head = await mirror.client.head("/v2/app/web/manifests/1.0")
    assert head.status == 500
    assert await head.read() == b""


async def test_internal_error_mid_blob_cuts_the_connection(
    mirror: Mirror,
    image: Image,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Once the headers went out a 500 is impossible; the client must see a cut
    # transfer at once, not wait for bytes that never come.
    real_sender = app_module.SocketSender

    class SendOnceThenFail:
        def __init__(self, fd: int) -> None:
            self._send = real_sender(fd)
            self._sent = False

        def __call__(self, data: memoryview) -> None:
            if self._sent:
                raise KeyError("bug mid-stream")
            self._sent = True
            self._send(data)

    monkeypatch.setattr(app_module, "SocketSender", SendOnceThenFail)
    await _pull_manifest(mirror, image)
    with caplog.at_level(logging.ERROR, logger="pullgate.http"):
        response = await mirror.client.get(f"/v2/app/web/blobs/{image.layers[0]}")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), timeout=30)
    assert any(
        r.exc_info is not None and isinstance(r.exc_info[1], KeyError) for r in caplog.records
    )


async def test_upstream_down_is_503_with_oci_error_json(policy_file: Path) -> None:
    # Nothing listens on this loopback port.
    config = mirror_config(f"http://127.0.0.1:{free_port()}", policy=policy_file)
    async with start_mirror(config) as mirror:
        response = await mirror.client.get("/v2/app/web/manifests/1.0")
        assert response.status == 503
        error = await _oci_error(response)
        assert error["code"] == "UPSTREAM_UNAVAILABLE"
        assert "cannot connect to upstream" in error["message"]


# ---- readiness and the access log -----------------------------------------------------


async def test_readyz_is_ready_with_the_policy_in_force_and_no_upstream_asked(
    mirror: Mirror, upstream: FakeRegistry
) -> None:
    seen = len(upstream.seen)
    response = await mirror.client.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["ready"] is True
    assert body["checks"]["policy"].startswith("in force (revision ")
    assert body["checks"]["cache"] == "none (streaming only)"
    assert len(upstream.seen) == seen  # readiness never depends on the upstream


async def test_readyz_is_not_ready_when_the_cache_directory_is_gone(
    upstream: FakeRegistry, image: Image, policy_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    async with (
        serve_fake_registry(upstream) as url,
        start_mirror(mirror_config(url, policy=policy_file, cache_dir=cache)) as running,
    ):
        assert (await running.client.get("/readyz")).status == 200
        (cache / "blobs").rename(tmp_path / "moved-away")
        response = await running.client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["ready"] is False and "is not writable" in body["checks"]["cache"]


async def test_each_request_has_one_access_line_and_denials_are_warnings(
    mirror: Mirror, upstream: FakeRegistry, image: Image, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_image("other/tool", "2", b"tool layer")
    with caplog.at_level(logging.INFO, logger="pullgate.access"):
        allowed = await mirror.client.get(
            "/v2/app/web/manifests/1.0", headers={"X-Request-Id": "req-1"}
        )
        await allowed.read()
        refused = await mirror.client.get("/v2/other/tool/manifests/2")
        await refused.read()
        await (await mirror.client.get("/metrics")).read()  # scrapes are not logged
    lines = [r for r in caplog.records if r.name == "pullgate.access"]
    assert len(lines) == 2
    served, denied = (r.fields for r in lines)
    assert lines[0].levelno == logging.INFO and lines[1].levelno == logging.WARNING
    assert served["request_id"] == "req-1" and served["front"] == "mirror"
    assert (served["status"], served["bytes"]) == (200, len(image.manifest))
    assert (served["registry"], served["repository"], served["reference"]) == (
        REGISTRY,
        "app/web",
        "1.0",
    )
    assert served["digest"] == str(image.digest) and served["verdict"] == "allow"
    assert denied["status"] == 403 and denied["code"] == "DENIED"
    assert "no policy scope matches" in denied["reason"]
    assert len(denied["request_id"]) == 16  # made up when the client sent none


async def test_time_to_first_byte_is_observed_by_kind_and_source(
    mirror: Mirror, image: Image
) -> None:
    def count(kind: str, source: str) -> float:
        labels = {"kind": kind, "source": source}
        value = mirror.metrics.registry.get_sample_value(
            "pullgate_first_byte_seconds_count", labels
        )
        return value or 0.0

    assert count("manifest", "upstream") == 0 and count("blob", "upstream") == 0
    await (await mirror.client.get("/v2/app/web/manifests/1.0")).read()
    await (await mirror.client.get(f"/v2/app/web/blobs/{image.layers[0]}")).read()
    assert count("manifest", "upstream") == 1
    assert count("blob", "upstream") == 1  # no cache: streamed from the upstream
    assert count("blob", "cache") == 0
