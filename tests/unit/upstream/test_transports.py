"""Transports in process: fake registries on loopback as origin and as transports, the
mirror wired as ``serve`` wires it, with and without a cache.

What a transport serves is untrusted: blobs only, checked against their digest; a
wrong digest marks it bad, a dead or silent one marks it down, and the next transport
(finally the origin) takes over.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cli.status import transport_lines
from proxy.config import (
    Config,
    ConfigError,
    TransportConfig,
    UpstreamConfig,
    load_config_file,
    make_upstream,
)
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.pipeline.gate import RepoKey
from proxy.pipeline.tarcheck import LayerPlan
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.session import new_upstream_session
from proxy.upstream.transports import SharedMarks, TransportChain
from tests.support.inprocess import (
    ALLOW_APP_POLICY,
    REGISTRY,
    FakeRegistry,
    Image,
    Mirror,
    Seen,
    mirror_config,
    serve_fake_registry,
    start_mirror,
)
from tests.support.peers import free_port
from tests.support.silent import SilentServer

LAYER = bytes((i * 13 + i // 241) & 0xFF for i in range(1024 * 1024 + 77))


class RecordingRegistry(FakeRegistry):
    """A fake registry that also keeps each request's Authorization header."""

    def __init__(self) -> None:
        super().__init__()
        self.authorization: list[str | None] = []
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.authorization.append(request.headers.get("Authorization"))
            self.headers.append(dict(request.headers))
            return await handler(request)

        app.middlewares.append(record)
        return app


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def origin() -> RecordingRegistry:
    return RecordingRegistry()


@pytest.fixture
def image(origin: RecordingRegistry) -> Image:
    return origin.add_image("app/web", "1.0", LAYER, b"second layer")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_APP_POLICY)
    return path


def transport(url: str, name: str, **values: float) -> TransportConfig:
    return TransportConfig(name=name, url=url, **values)


def with_transports(
    origin_url: str,
    transports: list[TransportConfig],
    *,
    policy: Path,
    cache_dir: Path | None,
) -> Config:
    config = mirror_config(origin_url, policy=policy, cache_dir=cache_dir)
    upstream = replace(config.upstreams[REGISTRY], transports=tuple(transports))
    return replace(config, upstreams={REGISTRY: upstream})


def sample(mirror: Mirror, name: str, **labels: str) -> float:
    value = mirror.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def pull_blob(mirror: Mirror, image: Image, digest: Digest) -> tuple[int, bytes, bool]:
    """Pull the manifest (by tag) then one blob: (status, bytes received, cut off)."""
    response = await mirror.client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 200
    response = await mirror.client.get(f"/v2/{image.repository}/blobs/{digest}")
    received = bytearray()
    try:
        async for piece in response.content.iter_any():
            received += piece
    except aiohttp.ClientPayloadError:
        return response.status, bytes(received), True
    return response.status, bytes(received), False


def blob_gets(registry: FakeRegistry, digest: Digest) -> int:
    return sum(
        1 for s in registry.requests_for("blobs") if s.method == "GET" and str(digest) in s.path
    )


@pytest.fixture(params=["uncached", "cached"])
def cache_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path / "cache" if request.param == "cached" else None


# ---- config ------------------------------------------------------------------------


def test_transports_parse_with_their_own_timeouts(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstreams:\n"
        "  docker.io:\n"
        "    url: https://registry-1.docker.io\n"
        "    transports:\n"
        "      - {name: spegel, url: 'http://127.0.0.1:30020',"
        " timeouts: {connect: 0.5, firstByte: 2, read: 20}, badFor: 600, downFor: 15,"
        " hedgeAfter: 0.25}\n"
        "      - https://regional-cache.example.test:5000\n"
        "      - {url: 'https://harbor.example.test', caFile: ca.pem}\n"
    )
    config = load_config_file(path)
    spegel, regional, harbor = config.upstreams["docker.io"].transports
    assert spegel == TransportConfig(
        name="spegel",
        url="http://127.0.0.1:30020",
        connect=0.5,
        first_byte=2.0,
        read=20.0,
        bad_for=600.0,
        down_for=15.0,
        hedge_after=0.25,
    )
    assert regional.hedge_after is None
    assert regional.name == "regional-cache.example.test:5000"
    assert regional.first_byte == TransportConfig("n", "u").first_byte
    assert harbor.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"url": "ftp://cache"}, "must be http"),
        ({"url": "http://cache/v2/proxy"}, "must not carry a path"),
        ({"url": "http://user@cache"}, "must not carry a path, query or user"),
        ({"url": "http://origin.example.test"}, "is the origin itself"),
        ({"name": "origin", "url": "http://cache"}, "other than 'origin'"),
        ({"url": "http://cache", "timeouts": {"firstByte": 0}}, "more than 0"),
        ({"url": "http://cache", "timeouts": {"firstByte": "soon"}}, "number of seconds"),
        ({"url": "http://cache", "timeouts": {"headers": 1}}, "unknown timeouts"),
        ({"url": "http://cache", "badFor": -1}, "more than 0"),
        ({"url": "http://cache", "hedgeAfter": 0}, "more than 0"),
        ({"url": "http://cache", "repositoryPrefix": "../x"}, "not a repository path"),
        ({"url": "http://cache", "repositoryPrefix": "Hub"}, "not a repository path"),
        ({"url": "http://cache", "repositoryPrefix": 3}, "must be a repository path"),
        ({"url": "http://cache", "retries": 3}, "unknown keys"),
        ({}, "'url' is required"),
    ],
)
def test_refuses_unusable_transport_entries(entry: dict[str, object], why: str) -> None:
    raw = {"url": "http://origin.example.test", "transports": [entry]}
    with pytest.raises(ConfigError, match=why):
        make_upstream("registry.example.test", raw, where="upstreams.registry.example.test")


def test_transport_headers_parse_but_never_carry_credentials() -> None:
    raw = {
        "url": "http://origin.example.test",
        "transports": [
            {"url": "http://127.0.0.1:4001", "headers": {"X-Dragonfly-Registry": "https://o"}}
        ],
    }
    (dragonfly,) = make_upstream("registry.example.test", raw, where="u").transports
    assert dragonfly.headers == (("X-Dragonfly-Registry", "https://o"),)
    for name in ("Authorization", "proxy-authorization", "Cookie", "Range"):
        entry = {"url": "http://127.0.0.1:4001", "headers": {name: "x"}}
        raw = {"url": "http://origin.example.test", "transports": [entry]}
        with pytest.raises(ConfigError, match="may not be sent to a transport"):
            make_upstream("registry.example.test", raw, where="u")
    entry = {"url": "http://127.0.0.1:4001", "headers": {"X-A": "b\r\nAuthorization: x"}}
    raw = {"url": "http://origin.example.test", "transports": [entry]}
    with pytest.raises(ConfigError, match="not a valid header line"):
        make_upstream("registry.example.test", raw, where="u")


@pytest.mark.parametrize("recipe", ["spegel.yaml", "dragonfly.yaml"])
def test_deploy_recipes_load_with_a_cluster_cache_as_first_transport(recipe: str) -> None:
    root = Path(__file__).resolve().parents[3]
    config = load_config_file(root / "deploy" / "transports" / recipe)
    first = config.upstreams["docker.io"].transports[0]
    assert first.name == recipe.removesuffix(".yaml")
    assert first.url.startswith("http://127.0.0.1:")
    # The rest is the DaemonSet's own node config.
    base = load_config_file(root / "deploy" / "daemonset" / "base" / "config.yaml")
    assert (config.listen_host, config.listen_port) == (base.listen_host, base.listen_port)
    assert config.cache == base.cache
    assert config.policy == base.policy


def test_refuses_duplicate_transport_names() -> None:
    raw = {
        "url": "http://origin.example.test",
        "transports": [{"name": "a", "url": "http://one"}, {"name": "a", "url": "http://two"}],
    }
    with pytest.raises(ConfigError, match="unique"):
        make_upstream("registry.example.test", raw, where="u")


def test_refuses_unknown_upstream_keys() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        make_upstream("r.example.test", {"url": "http://o", "transport": ["http://t"]}, where="u")


def test_upstream_without_transports_has_none() -> None:
    assert make_upstream("r.example.test", "http://o", where="u") == UpstreamConfig(
        name="r.example.test", url="http://o"
    )


# ---- health ------------------------------------------------------------------------


async def test_marked_transport_is_bypassed_for_its_period_then_used_again() -> None:
    now = [1000.0]
    metrics = Metrics()
    async with new_upstream_session() as session:
        chain = TransportChain(
            registry=REGISTRY,
            transports=(transport("http://127.0.0.1:9", "t", bad_for=60, down_for=5),),
            session=session,
            metrics=metrics,
            clock=lambda: now[0],
        )
        (only,) = chain.transports
        only.report_broken("digest")
        assert only.bypassed()
        chain.refresh_gauges()
        gauge = {"registry": REGISTRY, "transport": "t"}
        assert metrics.registry.get_sample_value("pullgate_transport_bypassed", gauge) == 1
        now[0] += 59
        assert only.bypassed()
        now[0] += 2
        assert not only.bypassed()
        chain.refresh_gauges()
        assert metrics.registry.get_sample_value("pullgate_transport_bypassed", gauge) == 0
        # Down (did not answer) is the shorter period.
        only.mark("refused", bad=False)
        now[0] += 5.5
        assert not only.bypassed()
        counted = {"registry": REGISTRY, "transport": "t", "reason": "digest"}
        assert metrics.registry.get_sample_value("pullgate_transport_marked_bad_total", counted)


async def test_a_mark_made_by_one_worker_is_honoured_by_the_others(tmp_path: Path) -> None:
    metrics = Metrics()
    config = (transport("http://127.0.0.1:9", "t", bad_for=60),)
    async with new_upstream_session() as session:
        marks = SharedMarks(tmp_path / "transports")
        one, other = (
            TransportChain(
                registry=REGISTRY,
                transports=config,
                session=session,
                metrics=metrics,
                marks=marks,
            ).transports[0]
            for _ in range(2)
        )
        assert not other.bypassed()
        one.report_broken("digest")
        assert other.bypassed()
        assert other.reason == "digest"
        assert 55 < other.bypassed_for() <= 60
        # A chain without shared marks (one worker) knows only its own.
        alone = TransportChain(
            registry=REGISTRY, transports=config, session=session, metrics=metrics
        ).transports[0]
        assert not alone.bypassed()


# ---- the mirror with transports ----------------------------------------------------


async def test_blob_comes_from_the_first_transport_with_ns_and_no_credentials(
    origin: RecordingRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    cache = RecordingRegistry()
    cache.blobs.update(origin.blobs)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(cache) as cache_url,
    ):
        regional = replace(
            transport(cache_url, "regional"), headers=(("X-Dragonfly-Registry", origin_url),)
        )
        config = with_transports(origin_url, [regional], policy=policy_file, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert blob_gets(origin, layer) == 0
            assert blob_gets(cache, layer) == 1
            asked = [s for s in cache.requests_for("blobs") if str(layer) in s.path]
            assert asked[0].query == {"ns": REGISTRY}
            assert cache.authorization == [None]
            assert cache.headers[0]["X-Dragonfly-Registry"] == origin_url
            served = {"registry": REGISTRY, "transport": "regional"}
            assert sample(mirror, "pullgate_transport_bytes_total", **served) == len(LAYER)
            assert (
                sample(
                    mirror, "pullgate_transport_bytes_total", registry=REGISTRY, transport="origin"
                )
                == 0
            )


async def test_repository_prefix_puts_the_request_under_a_proxy_cache_project(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    harbor = FakeRegistry()
    harbor.blobs.update(origin.blobs)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(harbor) as harbor_url,
    ):
        project = replace(transport(harbor_url, "harbor"), repository_prefix="hub-proxy")
        config = with_transports(origin_url, [project], policy=policy_file, cache_dir=None)
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            (asked,) = harbor.requests_for("blobs")
            assert asked.path == f"/v2/hub-proxy/app/web/blobs/{layer}"
            assert blob_gets(origin, layer) == 0


async def test_missing_blob_on_transports_comes_from_origin(
    origin: RecordingRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    empty = FakeRegistry()
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(empty) as empty_url,
    ):
        config = with_transports(
            origin_url, [transport(empty_url, "empty")], policy=policy_file, cache_dir=cache_dir
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert blob_gets(empty, layer) == 1
            assert blob_gets(origin, layer) == 1
            missing = {"registry": REGISTRY, "transport": "empty", "reason": "not_found"}
            assert sample(mirror, "pullgate_transport_failovers_total", **missing) == 1
            # Not having a blob is no fault: the transport stays in use.
            assert not sample(
                mirror, "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="empty"
            )


async def test_refuses_to_deliver_a_transports_corrupted_blob_and_bypasses_it(
    origin: RecordingRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    evil = FakeRegistry()
    evil.blobs.update(origin.blobs)
    layer = image.layers[0]
    evil.corrupt.add(layer)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(evil) as evil_url,
    ):
        config = with_transports(
            origin_url, [transport(evil_url, "evil")], policy=policy_file, cache_dir=cache_dir
        )
        async with start_mirror(config) as mirror:
            status, body, cut = await pull_blob(mirror, image, layer)
            # The stream was cut before its held-back tail: never a complete wrong body.
            assert cut
            assert len(body) < len(LAYER)
            assert mirror.pipeline.store.path_of(layer) is None
            labels = {"registry": REGISTRY, "transport": "evil", "reason": "digest"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **labels) == 1
            # The next pull skips the bad transport and gets the origin's bytes.
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert blob_gets(evil, layer) == 1
            assert blob_gets(origin, layer) == 1
            skipped = {"registry": REGISTRY, "transport": "evil", "reason": "skipped"}
            assert sample(mirror, "pullgate_transport_failovers_total", **skipped) == 1


async def test_refused_transport_fails_over_and_is_marked_down(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with serve_fake_registry(origin) as origin_url:
        config = with_transports(
            origin_url, [transport(dead, "dead")], policy=policy_file, cache_dir=None
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            for _ in range(2):
                status, body, cut = await pull_blob(mirror, image, layer)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
            down = {"registry": REGISTRY, "transport": "dead", "reason": "refused"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **down) == 1
            skipped = {"registry": REGISTRY, "transport": "dead", "reason": "skipped"}
            assert sample(mirror, "pullgate_transport_failovers_total", **skipped) == 1


async def test_silent_transport_costs_one_pull_its_first_byte_timeout(
    origin: RecordingRegistry, image: Image, policy_file: Path, silent: SilentServer
) -> None:
    cache = FakeRegistry()
    cache.blobs.update(origin.blobs)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(cache) as cache_url,
    ):
        config = with_transports(
            origin_url,
            [
                transport(silent.url, "silent", first_byte=0.5, read=30, down_for=300),
                transport(cache_url, "regional"),
            ],
            policy=policy_file,
            cache_dir=None,
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            for _ in range(3):
                status, body, cut = await asyncio.wait_for(pull_blob(mirror, image, layer), 30)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
            # One pull waited for the silent transport; the others went straight on.
            assert silent.accepted == 1
            assert blob_gets(cache, layer) == 3
            assert blob_gets(origin, layer) == 0
            timed_out = {"registry": REGISTRY, "transport": "silent", "reason": "first_byte"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **timed_out) == 1


async def test_transport_manifest_for_the_tag_changes_nothing(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    evil = FakeRegistry()
    other = evil.add_image("app/web", "1.0", b"what the transport would rather serve")
    evil.blobs.update(origin.blobs)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(evil) as evil_url,
    ):
        config = with_transports(
            origin_url, [transport(evil_url, "evil")], policy=policy_file, cache_dir=None
        )
        async with start_mirror(config) as mirror:
            for ref in (image.tag, str(image.digest), str(other.digest)):
                response = await mirror.client.get(f"/v2/app/web/manifests/{ref}")
                if ref == str(other.digest):
                    assert response.status == 404  # only the origin is asked
                    continue
                assert response.status == 200
                assert await response.read() == image.manifest
            assert evil.requests_for("manifests") == []


# ---- status ------------------------------------------------------------------------


def test_doctor_lines_come_from_the_metrics_exposition() -> None:
    metrics = Metrics()
    metrics.transport_bytes.labels(REGISTRY, "spegel").inc(1000)
    metrics.transport_bytes.labels(REGISTRY, "origin").inc(24)
    metrics.transport_failovers.labels(REGISTRY, "spegel", "skipped").inc(3)
    metrics.transport_marked_bad.labels(REGISTRY, "spegel", "digest").inc()
    metrics.transport_bypassed.labels(REGISTRY, "spegel").set(1)
    metrics.transport_bypassed.labels(REGISTRY, "dragonfly").set(0)
    lines = transport_lines(metrics.exposition().decode())
    rendered = [line.render() for line in lines]
    assert rendered == [
        f"transport {REGISTRY} spegel: bypassed, 1000 bytes, failovers skipped=3, marked digest=1",
        f"transport {REGISTRY} dragonfly: in use, 0 bytes, failovers none, marked none",
        f"transport {REGISTRY} origin: 24 bytes",
    ]


class FailingRegistry(FakeRegistry):
    """Answers every blob request with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def fail(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if "/blobs/" in request.path:
                self.seen.append(
                    Seen(request.method, request.path, dict(request.query), request.query_string)
                )
                return web.Response(status=self.status, text="injected")
            return await handler(request)

        app.middlewares.append(fail)
        return app


@pytest.mark.parametrize(("status", "marked"), [(503, True), (429, True), (403, False)])
async def test_failing_transport_status_moves_on_and_marks_it_down_only_when_unwell(
    origin: RecordingRegistry, image: Image, policy_file: Path, status: int, marked: bool
) -> None:
    failing = FailingRegistry(status)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(failing) as failing_url,
    ):
        config = with_transports(
            origin_url, [transport(failing_url, "failing")], policy=policy_file, cache_dir=None
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            for _ in range(2):
                got, body, cut = await pull_blob(mirror, image, layer)
                assert (got, cut) == (200, False)
                assert Digest.of(body) == layer
            asked = len(failing.requests_for("blobs"))
            down = {"registry": REGISTRY, "transport": "failing", "reason": "status"}
            if marked:
                # Unwell: marked down once, and the second pull went straight on.
                assert asked == 1
                assert sample(mirror, "pullgate_transport_marked_bad_total", **down) == 1
            else:
                # "Not for you": asked each time, never marked.
                assert asked == 2
                assert sample(mirror, "pullgate_transport_marked_bad_total", **down) == 0


# ---- hedged requests ---------------------------------------------------------------


async def test_hedged_transport_is_raced_by_the_next_and_loses_without_a_mark(
    origin: RecordingRegistry, image: Image, policy_file: Path, silent: SilentServer
) -> None:
    cache = FakeRegistry()
    cache.blobs.update(origin.blobs)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(cache) as cache_url,
    ):
        config = with_transports(
            origin_url,
            [
                transport(silent.url, "slow", first_byte=30, hedge_after=0.2),
                transport(cache_url, "regional"),
            ],
            policy=policy_file,
            cache_dir=None,
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            for _ in range(2):
                status, body, cut = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
            # Both pulls asked the slow transport, raced it with the next, and the
            # next won; losing a race is no fault: the slow one is not marked.
            assert silent.accepted == 2
            assert blob_gets(cache, layer) == 2
            assert blob_gets(origin, layer) == 0
            hedged = {"registry": REGISTRY, "transport": "slow", "reason": "hedged"}
            assert sample(mirror, "pullgate_transport_failovers_total", **hedged) == 2
            assert not sample(
                mirror, "pullgate_transport_marked_bad_total", registry=REGISTRY, transport="slow"
            )


async def test_hedge_races_the_origin_when_no_transport_is_left(
    origin: RecordingRegistry, image: Image, policy_file: Path, silent: SilentServer
) -> None:
    async with serve_fake_registry(origin) as origin_url:
        config = with_transports(
            origin_url,
            [transport(silent.url, "slow", first_byte=30, hedge_after=0.2)],
            policy=policy_file,
            cache_dir=None,
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert blob_gets(origin, layer) == 1
            assert sample(
                mirror, "pullgate_transport_bytes_total", registry=REGISTRY, transport="origin"
            ) == len(LAYER)


async def test_without_hedging_a_missing_blob_asks_one_transport_at_a_time(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    first, second = FakeRegistry(), FakeRegistry()
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(first) as first_url,
        serve_fake_registry(second) as second_url,
    ):
        config = with_transports(
            origin_url,
            [transport(first_url, "first"), transport(second_url, "second")],
            policy=policy_file,
            cache_dir=None,
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert [blob_gets(r, layer) for r in (first, second, origin)] == [1, 1, 1]
            for name in ("first", "second"):
                missing = {"registry": REGISTRY, "transport": name, "reason": "not_found"}
                assert sample(mirror, "pullgate_transport_failovers_total", **missing) == 1


# ---- a hostile transport (security review) -----------------------------------------


class DripServer:
    """Answers a status line, then drips header bytes one at a time and never ends the
    headers (bounded: it gives up after ``limit`` seconds): a transport that keeps a
    per-read timer alive while never answering."""

    def __init__(self, *, every: float = 0.05, limit: float = 60.0) -> None:
        self._every = every
        self._limit = limit
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                for _ in range(int(self._limit / self._every)):
                    if self._stop.wait(self._every):
                        return
                    conn.sendall(b"a")
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for thread in self._threads:
            thread.join(5)
        self._sock.close()


async def test_refuses_to_wait_past_first_byte_for_headers_a_transport_drips(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    drip = DripServer()
    try:
        async with serve_fake_registry(origin) as origin_url:
            config = with_transports(
                origin_url,
                [transport(drip.url, "drip", first_byte=0.5, read=30, down_for=300)],
                policy=policy_file,
                cache_dir=None,
            )
            async with start_mirror(config) as mirror:
                layer = image.layers[0]
                # The drip keeps a per-read timer alive for a minute; firstByte bounds
                # the whole wait for the headers, so the origin takes over long before.
                status, body, cut = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
                assert blob_gets(origin, layer) == 1
                assert drip.accepted == 1
                timed_out = {"registry": REGISTRY, "transport": "drip", "reason": "first_byte"}
                assert sample(mirror, "pullgate_transport_marked_bad_total", **timed_out) == 1
    finally:
        drip.close()


class CookieRegistry(RecordingRegistry):
    """A registry that sets a cookie on every answer and records the ones it is sent."""

    def __init__(self, cookie: str) -> None:
        super().__init__()
        self.cookie = cookie
        self.cookies_seen: list[str] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def cookies(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if "Cookie" in request.headers:
                self.cookies_seen.append(request.headers["Cookie"])
            response = await handler(request)
            response.headers.add("Set-Cookie", f"{self.cookie}; Path=/")
            return response

        app.middlewares.append(cookies)
        return app


async def test_refuses_to_carry_cookies_between_the_origin_and_a_transport(
    policy_file: Path,
) -> None:
    origin = CookieRegistry("origin_session=origin-secret")
    image = origin.add_image("app/web", "1.0", LAYER, b"second layer")
    cache = CookieRegistry("planted=by-the-transport")
    cache.blobs[image.layers[0]] = origin.blobs[image.layers[0]]
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(cache) as cache_url,
    ):
        # One host name for both, as a node-local cache next to a same-host origin, or
        # a cache and an origin under one parent domain: cookies ignore ports.
        origin_url = origin_url.replace("127.0.0.1", "localhost")
        cache_url = cache_url.replace("127.0.0.1", "localhost")
        config = with_transports(
            origin_url, [transport(cache_url, "regional")], policy=policy_file, cache_dir=None
        )
        async with start_mirror(config) as mirror:
            # The origin answers the manifest (and sets its cookie), the transport the
            # first layer (and plants one), the origin the second layer.
            for layer in image.layers:
                status, body, cut = await pull_blob(mirror, image, layer)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
            assert blob_gets(cache, image.layers[0]) == 1
            assert blob_gets(origin, image.layers[1]) == 1
            assert cache.cookies_seen == []
            assert origin.cookies_seen == []


class EndlessRegistry(FakeRegistry):
    """Answers every blob request 200 with a chunked body of no announced length that
    goes on (bounded: ``limit`` bytes) for as long as the reader reads."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sent = 0

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def endless(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if "/blobs/" not in request.path:
                return await handler(request)
            self.seen.append(
                Seen(request.method, request.path, dict(request.query), request.query_string)
            )
            response = web.StreamResponse(status=200)
            response.enable_chunked_encoding()
            await response.prepare(request)
            piece = b"\0" * (1024 * 1024)
            try:
                while self.sent < self.limit:
                    await response.write(piece)
                    self.sent += len(piece)
            except (ConnectionError, RuntimeError):
                pass
            return response

        app.middlewares.append(endless)
        return app


async def test_refuses_a_transport_body_without_a_length_that_could_fill_the_cache(
    origin: RecordingRegistry, image: Image, policy_file: Path, tmp_path: Path
) -> None:
    endless = EndlessRegistry(limit=64 * 1024 * 1024)
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(endless) as endless_url,
    ):
        config = with_transports(
            origin_url,
            [transport(endless_url, "endless")],
            policy=policy_file,
            cache_dir=tmp_path / "cache",
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await asyncio.wait_for(pull_blob(mirror, image, layer), 60)
            # Without a length nothing bounds what a fill would write to the disk: such
            # an answer is not used, and the origin serves the blob.
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            assert blob_gets(origin, layer) == 1
            assert endless.sent < endless.limit
            unusable = {"registry": REGISTRY, "transport": "endless", "reason": "no_length"}
            assert sample(mirror, "pullgate_transport_failovers_total", **unusable) == 1


@pytest.mark.parametrize(
    "until",
    ["1e300", "Infinity", "NaN", '"soon"', "null"],
    ids=["far-future", "infinity", "nan", "string", "null"],
)
async def test_refuses_a_shared_mark_beyond_the_transports_own_periods(
    tmp_path: Path, until: str
) -> None:
    """A mark file another worker wrote (or one written before the wall clock stepped
    back) never bypasses a transport longer than its own badFor/downFor."""
    now = [1000.0]
    metrics = Metrics()
    config = (transport("http://127.0.0.1:9", "t", bad_for=60, down_for=5),)
    async with new_upstream_session() as session:
        marks = SharedMarks(tmp_path / "transports")
        (reader,) = TransportChain(
            registry=REGISTRY,
            transports=config,
            session=session,
            metrics=metrics,
            clock=lambda: now[0],
            marks=marks,
        ).transports
        path = marks.path(REGISTRY, "t")
        path.write_text('{"until": ' + until + ', "reason": "digest"}')
        reader.bypassed()
        assert reader.bypassed_for() <= 60
        now[0] += 61
        assert not reader.bypassed()


async def test_a_mark_replaced_within_one_timestamp_tick_is_still_seen(tmp_path: Path) -> None:
    """File timestamps are coarse (a kernel tick): a second mark written right after the
    first can carry the same mtime, and must not be taken for the one already read."""
    now = [1000.0]
    metrics = Metrics()
    config = (transport("http://127.0.0.1:9", "t", bad_for=600, down_for=5),)
    async with new_upstream_session() as session:
        marks = SharedMarks(tmp_path / "transports")
        writer, reader = (
            TransportChain(
                registry=REGISTRY,
                transports=config,
                session=session,
                metrics=metrics,
                clock=lambda: now[0],
                marks=marks,
            ).transports[0]
            for _ in range(2)
        )
        writer.mark("refused", bad=False)
        assert reader.bypassed()
        path = marks.path(REGISTRY, "t")
        first = path.stat().st_mtime_ns
        writer.report_broken("digest")
        os.utime(path, ns=(first, first))  # the same tick
        # Past the first (down) mark, the second (bad) one still holds.
        now[0] += 6
        assert reader.bypassed()
        assert reader.reason == "digest"
        assert reader.bypassed_for() > 60


async def test_a_hedged_answer_that_loses_a_tie_is_closed_not_leaked() -> None:
    """Two candidates that answer in the same turn of the loop: one is served, the
    other's response (and its connection) is closed, not left to the garbage collector."""

    async def slow_blob(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(body=big)

    async def origin_blob(request: web.Request) -> web.Response:
        return web.Response(body=big)

    big = bytes(32 * 1024 * 1024)  # more than a read buffer: open until read or closed

    app = web.Application()
    app.router.add_get("/v2/{name:.*}", slow_blob)
    origin_app = web.Application()
    origin_app.router.add_get("/v2/{name:.*}", origin_blob)
    metrics = Metrics()
    async with (
        TestServer(app, host="127.0.0.1") as server,
        TestServer(origin_app, host="127.0.0.1") as origin_server,
        new_upstream_session() as session,
    ):
        url = str(server.make_url("")).rstrip("/")
        chain = TransportChain(
            registry=REGISTRY,
            transports=(transport(url, "slow", hedge_after=0.05),),
            session=session,
            metrics=metrics,
        )
        origin_response = UpstreamResponse(
            await session.get(str(origin_server.make_url("/v2/a/blobs/sha256:00")))
        )
        asking: list[asyncio.Task[object]] = []

        def origin() -> asyncio.Future[UpstreamResponse]:
            # Hedged in: answer in the very turn the transport's answer completes.
            (ask,) = [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "TransportChain._ask"
            ]
            asking.append(ask)
            answer: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()
            ask.add_done_callback(lambda _: answer.set_result(origin_response))
            return answer

        served = await chain.open_blob("/v2/a/blobs/sha256:00", origin=origin)
        (ask,) = asking
        from_transport = ask.result()
        assert isinstance(from_transport, UpstreamResponse)
        loser = from_transport if served is origin_response else origin_response
        assert served is not loser
        assert loser._response.closed
        assert not served._response.closed
        served.close()


class BasicAuthRegistry(RecordingRegistry):
    """An origin that answers only requests carrying the node's basic credentials."""

    CREDENTIALS = "Basic " + base64.b64encode(b"node:n0de-secret").decode()

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def require(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.headers.get("Authorization") != self.CREDENTIALS:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="o"'})
            return await handler(request)

        app.middlewares.append(require)
        return app


class LuringTransport(RecordingRegistry):
    """A transport that tries to get credentials: it challenges for them (basic, and
    bearer with a token realm of its own), or redirects the blob GET to the origin."""

    def __init__(self, mode: str, origin_url: str) -> None:
        super().__init__()
        self.mode = mode
        self.origin_url = origin_url
        self.realm_requests = 0

    def app(self) -> web.Application:
        app = super().app()

        async def token(request: web.Request) -> web.Response:
            self.realm_requests += 1
            return web.json_response({"token": "lured"})

        @web.middleware
        async def lure(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if "/blobs/" not in request.path:
                return await handler(request)
            if self.mode == "redirect":
                raise web.HTTPTemporaryRedirect(f"{self.origin_url}{request.path}")
            realm = f"http://{request.host}/token"
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="t"'},
            )

        app.router.add_get("/token", token)
        app.middlewares.append(lure)
        return app


@pytest.mark.parametrize("mode", ["challenge", "redirect"])
async def test_refuses_to_give_origin_credentials_to_a_transport_that_challenges_or_redirects(
    policy_file: Path, tmp_path: Path, mode: str
) -> None:
    origin = BasicAuthRegistry()
    image = origin.add_image("app/web", "1.0", LAYER)
    auth = base64.b64encode(b"node:n0de-secret").decode()
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"auths": {REGISTRY: {"auth": auth}}}))
    async with serve_fake_registry(origin) as origin_url:
        luring = LuringTransport(mode, origin_url)
        async with serve_fake_registry(luring) as luring_url:
            config = with_transports(
                origin_url, [transport(luring_url, "luring")], policy=policy_file, cache_dir=None
            )
            config = replace(config, docker_config=docker_config)
            async with start_mirror(config) as mirror:
                layer = image.layers[0]
                status, body, cut = await pull_blob(mirror, image, layer)
                assert (status, cut) == (200, False)
                assert Digest.of(body) == layer
        # The origin got the credentials; the transport (and its token realm) never did,
        # nor did the origin on the request the transport redirected there.
        assert BasicAuthRegistry.CREDENTIALS in origin.authorization
        assert luring.authorization == [None]
        assert luring.realm_requests == 0
        # Without credentials at the origin: its first request (the manifest, before the
        # challenge) and, when redirected, the transport's blob GET.
        assert origin.authorization.count(None) == (2 if mode == "redirect" else 1)


async def test_refuses_to_complete_a_range_of_a_blob_a_transport_corrupted(
    origin: RecordingRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    """A resumed pull (``Range``) is verified like a whole one: the range's bytes come
    out of a whole-blob fetch, and its held-back end only once the whole blob matched."""
    evil = FakeRegistry()
    evil.blobs.update(origin.blobs)
    layer = image.layers[0]
    evil.corrupt.add(layer)
    middle = len(LAYER) // 2
    wanted = f"bytes={middle - 1000}-{middle + 1000}"  # the flipped byte is in it
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(evil) as evil_url,
    ):
        config = with_transports(
            origin_url, [transport(evil_url, "evil")], policy=policy_file, cache_dir=cache_dir
        )
        async with start_mirror(config) as mirror:
            response = await mirror.client.get(f"/v2/{image.repository}/manifests/{image.tag}")
            assert response.status == 200
            outcomes = []
            for _ in range(2):
                response = await mirror.client.get(
                    f"/v2/{image.repository}/blobs/{layer}", headers={"Range": wanted}
                )
                received = bytearray()
                try:
                    async for piece in response.content.iter_any():
                        received += piece
                    outcomes.append((response.status, bytes(received), False))
                except aiohttp.ClientPayloadError:
                    outcomes.append((response.status, bytes(received), True))
            (_, first, cut), (status, second, second_cut) = outcomes
            assert cut
            assert len(first) < 2001
            # The transport is bypassed; the origin's bytes make up the range.
            assert (status, second_cut) == (206, False)
            assert second == LAYER[middle - 1000 : middle + 1001]
            assert blob_gets(origin, layer) == 1


def tar_layer(*members: tuple[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def test_refuses_to_let_a_transports_corruption_condemn_a_signed_layer(
    policy_file: Path, cache_dir: Path | None
) -> None:
    """A model layer with a per-file plan: a transport that flips a byte inside a signed
    file fails that pull (and is marked bad), but the layer is not remembered as
    refused: its bytes were the transport's, not the layer's. The next pull gets the
    origin's bytes, which pass."""
    weights = bytes((i * 7 + i // 251) & 0xFF for i in range(400 * 1024))
    tail = b"tail of the model" * 6000
    layer_bytes = tar_layer(("weights.bin", weights), ("tail.bin", tail))
    origin = FakeRegistry()
    image = origin.add_image("app/web", "1.0", layer_bytes)
    layer = image.layers[0]
    evil = FakeRegistry()
    evil.blobs.update(origin.blobs)
    evil.corrupt.add(layer)  # the flipped byte is inside weights.bin
    plan = LayerPlan(
        compression="none",
        files=(
            ("weights.bin", hashlib.sha256(weights).hexdigest()),
            ("tail.bin", hashlib.sha256(tail).hexdigest()),
        ),
        source="the model's signature",
    )
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(evil) as evil_url,
    ):
        config = with_transports(
            origin_url, [transport(evil_url, "evil")], policy=policy_file, cache_dir=cache_dir
        )
        async with start_mirror(config) as mirror:
            # What a verified model signature gives this layer here.
            mirror.pipeline.layer_checks.expect(RepoKey(REGISTRY, "app/web"), layer, plan)
            status, body, cut = await pull_blob(mirror, image, layer)
            assert cut or status != 200
            assert body != layer_bytes
            marked = {"registry": REGISTRY, "transport": "evil", "reason": "digest"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **marked) == 1
            status, body, cut = await pull_blob(mirror, image, layer)
            assert (status, cut) == (200, False)
            assert body == layer_bytes
            assert blob_gets(origin, layer) == 1


async def test_refuses_to_stream_a_node_local_service_a_transport_redirects_to(
    origin: RecordingRegistry, image: Image, policy_file: Path
) -> None:
    """pullgate reaches what the transport cannot: the node's loopback services, the
    cloud metadata address. A transport that redirects the blob GET there must not get
    their answer streamed (all but the held-back tail) to a client on the node."""
    secret = b"SECRET node-local answer " * 20000  # far more than the held-back tail

    async def internal(request: web.Request) -> web.Response:
        return web.Response(body=secret)

    internal_app = web.Application()
    internal_app.router.add_get("/{path:.*}", internal)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{internal_url}/status")

    luring_app = web.Application()
    luring_app.router.add_get("/v2/{path:.*}", redirect)
    async with (
        TestServer(internal_app, host="127.0.0.1") as internal_server,
        TestServer(luring_app, host="127.0.0.1") as luring_server,
        serve_fake_registry(origin) as origin_url,
    ):
        internal_url = str(internal_server.make_url("")).rstrip("/")
        luring_url = str(luring_server.make_url("")).rstrip("/")
        config = with_transports(
            origin_url, [transport(luring_url, "luring")], policy=policy_file, cache_dir=None
        )
        async with start_mirror(config) as mirror:
            layer = image.layers[0]
            status, body, cut = await pull_blob(mirror, image, layer)
            assert b"SECRET" not in body
            assert (status, cut) == (200, False)
            assert Digest.of(body) == layer
            refused = {"registry": REGISTRY, "transport": "luring", "reason": "redirect"}
            assert sample(mirror, "pullgate_transport_failovers_total", **refused) == 1
