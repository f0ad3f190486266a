"""Running it on a node: readiness, structured logs, and a graceful stop mid-stream."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.ocilayout import deterministic_bytes, push_blob, push_image, write_blob_file
from tests.support.peers import Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
GIB = 1 << 30


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_json_logs_have_one_parsable_line_per_request_with_denials_as_warnings(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'default: deny\nscopes:\n  - match: "{REGISTRY}/open/**"\n    mode: allow\n')
    push_image(registry.url, "open/app", "v1", layers=[deterministic_bytes(2000, 81)])
    push_image(registry.url, "closed/app", "v1", layers=[deterministic_bytes(2000, 82)])
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, policy=policy, extra_args=["--log-format", "json"]
    )
    assert _get(f"{pullgate.url}/v2/open/app/manifests/v1?ns={REGISTRY}")[0] == 200
    assert _get(f"{pullgate.url}/v2/closed/app/manifests/v1?ns={REGISTRY}")[0] == 403
    lines = [json.loads(line) for line in pullgate.log_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "pullgate.access"]
    served = next(line for line in access if line.get("repository") == "open/app")
    denied = next(line for line in access if line.get("repository") == "closed/app")
    assert served["level"] == "info" and served["status"] == 200
    assert served["registry"] == REGISTRY and served["digest"].startswith("sha256:")
    assert served["bytes"] > 0 and served["duration_ms"] >= 0 and served["request_id"]
    assert denied["level"] == "warning" and denied["status"] == 403
    assert denied["code"] == "DENIED" and "default is deny" in denied["reason"]


def test_readyz_answers_without_the_upstream(
    registry: Registry, make_pullgate: Callable[..., Pullgate], tmp_path: Path
) -> None:
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache")
    registry.stop()  # an upstream outage does not make the node's mirror unready
    status, body = _get(f"{pullgate.admin_url}/readyz")
    assert status == 200
    checks = json.loads(body)["checks"]
    assert checks["cache"].startswith("open (") and checks["policy"].startswith("none")


def test_sigterm_during_a_1_gib_stream_lets_it_finish_then_exits_0(
    tmp_path: Path, registry: Registry, make_pullgate: Callable[..., Pullgate]
) -> None:
    source = tmp_path / "big.bin"
    digest = write_blob_file(source, GIB, seed=83)
    push_blob(registry.url, "big/model", source, digest=digest)
    source.unlink()
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, workers=1)
    assert pullgate.process is not None
    host, port = pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", f"/v2/big/model/blobs/{digest}?ns={REGISTRY}")
        response = conn.getresponse()
        assert response.status == 200
        hasher = hashlib.sha256()
        received = 0
        while received < 64 << 20:  # well into the stream
            chunk = response.read(1 << 20)
            hasher.update(chunk)
            received += len(chunk)
        pullgate.process.send_signal(signal.SIGTERM)
        while chunk := response.read(4 << 20):
            hasher.update(chunk)
            received += len(chunk)
    finally:
        conn.close()
    assert received == GIB
    assert "sha256:" + hasher.hexdigest() == digest
    # The drain deadline is 20 s; the process then exits 0.
    assert pullgate.process.wait(timeout=40) == 0, pullgate.log_text()[-3000:]
    assert "finishing requests in flight" in pullgate.log_text()
