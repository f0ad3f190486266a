"""``ns=`` routing: what a pod on the node can make the router do by naming registries."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp

from proxy.config import Config, UpstreamConfig
from proxy.metrics import Metrics
from proxy.upstream.auth import Credentials, load_docker_config
from proxy.upstream.router import MAX_LABELLED_REGISTRIES, MAX_UNLISTED_CLIENTS, UpstreamRouter

CONFIGURED = "registry.example.test"


async def test_refuses_to_let_a_flood_of_ns_names_lock_out_new_registries() -> None:
    """Naming many registries (each costs a pod one request) must not leave the node
    unable to reach a registry it had not pulled from yet."""
    config = Config(
        upstreams={CONFIGURED: UpstreamConfig(CONFIGURED, "http://127.0.0.1:9")},
        unlisted_registries="https",
    )
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        router = UpstreamRouter(config=config, session=session, metrics=metrics)
        configured = router.route(CONFIGURED).client
        for n in range(MAX_UNLISTED_CLIENTS + 100):
            router.route(f"flood{n}.example.test")
        route = router.route("ghcr.io")
        assert route.registry == "ghcr.io"
        assert route.client.name == "ghcr.io"
        # A configured upstream's client (its tokens, its transports) is never dropped.
        assert router.route(CONFIGURED).client is configured
        assert len(router._clients) <= MAX_UNLISTED_CLIENTS + len(config.upstreams)
        # Nor can it grow the metrics without end: past a bound, unlisted registries
        # share one label.
        (family,) = metrics.transport_bytes.collect()
        registries = {sample.labels["registry"] for sample in family.samples}
        assert CONFIGURED in registries and "other" in registries
        assert len(registries) <= MAX_LABELLED_REGISTRIES + 2


async def test_refuses_to_treat_the_https_port_as_another_registry() -> None:
    """``host:443`` is the same origin as ``host``: as a registry of its own it was
    reached directly, past the configured upstream, under a name no policy scope for
    ``host`` matched (a bypass wherever the policy's default is warn or allow)."""
    config = Config(
        upstreams={CONFIGURED: UpstreamConfig(CONFIGURED, "http://127.0.0.1:9")},
        unlisted_registries="https",
    )
    async with aiohttp.ClientSession() as session:
        router = UpstreamRouter(config=config, session=session, metrics=Metrics())
        configured = router.route(CONFIGURED)
        for alias in (f"{CONFIGURED}:443", f"{CONFIGURED.upper()}:0443"):
            route = router.route(alias)
            assert route.registry == CONFIGURED
            assert route.client is configured.client
        for hub in ("docker.io:443", "registry-1.docker.io:443", "index.docker.io:00443"):
            assert router.route(hub).registry == "docker.io"
        # Another port is another registry.
        assert router.route(f"{CONFIGURED}:5000").registry == f"{CONFIGURED}:5000"
        assert router.route("[::1]:443").registry == "[::1]"


async def test_node_credentials_for_the_https_port_are_the_registrys(tmp_path: Path) -> None:
    """A kubelet ``config.json`` entry for ``host:443`` still reaches ``host`` (one
    registry since ns=host:443 routes as host)."""
    path = tmp_path / "config.json"
    auth = base64.b64encode(b"node:secret").decode()
    path.write_text(json.dumps({"auths": {f"https://{CONFIGURED}:443/v1/": {"auth": auth}}}))
    assert load_docker_config(path) == {CONFIGURED: Credentials("node", "secret")}
