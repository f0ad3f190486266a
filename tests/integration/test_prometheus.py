"""A real Prometheus scrapes pullgate: the metrics read back through its HTTP API, and
``promtool check metrics`` accepts pullgate's exposition."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import cosign_sign as cs
from tests.support.cri import sign_image
from tests.support.ocilayout import deterministic_bytes, push_image
from tests.support.peers import Prometheus, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "pullgate-dashboard.json"


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[Pullgate], Prometheus]]:
    started: list[Prometheus] = []

    def start(pullgate: Pullgate) -> Prometheus:
        target = pullgate.admin_url.removeprefix("http://")
        peer = Prometheus(tmp_path / "prometheus", [target]).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def _value(prometheus: Prometheus, expression: str, *, at_least: float) -> float:
    """The expression's value once Prometheus scraped it at ``at_least`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        result = prometheus.query(expression)
        value = float(result[0]["value"][1]) if result else 0.0
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_prometheus_reads_back_the_verdicts_and_bytes_of_an_allowed_and_a_refused_pull(
    tmp_path: Path,
    registry: Registry,
    make_pullgate: Callable[..., Pullgate],
    prometheus_for: Callable[[Pullgate], Prometheus],
) -> None:
    key = cs.generate_key()
    key.write_public(tmp_path / "policy" / "keys" / "release.pub")
    policy = tmp_path / "policy" / "policy.yaml"
    policy.write_text(
        "default: deny\nscopes:\n"
        f'  - match: "{REGISTRY}/**"\n'
        "    require: {cosign: {key: keys/release.pub}}\n"
    )
    layer = deterministic_bytes(300_000, 91)
    signed = push_image(registry.url, "prom/app", "signed", layers=[layer])
    sign_image(registry, key, REGISTRY, signed)
    push_image(registry.url, "prom/app", "unsigned", layers=[deterministic_bytes(1000, 92)])
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy)
    base = f"{pullgate.url}/v2/prom/app"
    assert _get(f"{base}/manifests/signed?ns={REGISTRY}") == 200
    assert _get(f"{base}/blobs/{signed.layer_digests[0]}?ns={REGISTRY}") == 200
    assert _get(f"{base}/manifests/unsigned?ns={REGISTRY}") == 403

    prometheus = prometheus_for(pullgate)
    allowed = 'sum(pullgate_verdicts_total{result="allow",front="mirror"})'
    assert _value(prometheus, allowed, at_least=1) >= 1
    assert _value(prometheus, 'sum(pullgate_denied_total{kind="manifest"})', at_least=1) == 1
    served = _value(prometheus, "sum(pullgate_bytes_served_total)", at_least=len(layer))
    assert served >= len(layer)
    checks = prometheus.query('pullgate_signature_checks_total{format="cosign",result="refused"}')
    assert [c["metric"]["requirement"] for c in checks] == ["cosign key keys/release.pub"]
    classes = {r["metric"]["class"] for r in prometheus.query("pullgate_verdict_reasons_total > 0")}
    assert {"verified", "refused"} <= classes
    (info,) = prometheus.query("pullgate_policy_info == 1")
    assert len(info["metric"]["revision"]) == 16
    # Every query of the Grafana dashboard is one Prometheus evaluates.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            prometheus.query(target["expr"])  # asserts status "success"


def test_promtool_accepts_pullgates_metrics(
    registry: Registry, make_pullgate: Callable[..., Pullgate], tmp_path: Path
) -> None:
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, cache_dir=tmp_path / "cache")
    with urllib.request.urlopen(f"{pullgate.admin_url}/metrics", timeout=10) as response:
        exposition = response.read()
    assert b"pullgate_build_info{" in exposition
    assert b"pullgate_cache_capacity_bytes " in exposition
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
