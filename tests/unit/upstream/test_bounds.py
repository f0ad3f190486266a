"""Bounded upstream bodies, in process: a minimum transfer rate (``minRate``) against
an upstream that drips its body just inside the read timeout, and the verified
manifest's descriptor size against an upstream whose length lies.

Fake registries on loopback stand in for the origin and the transports; the mirror is
wired as ``serve`` wires it (``tests.support.inprocess``), with and without a cache.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config import (
    DEFAULT_MIN_RATE,
    DEFAULT_MIN_RATE_WINDOW,
    Config,
    ConfigError,
    RetryConfig,
    TimeoutConfig,
    TransportConfig,
    UpstreamConfig,
    load_config_file,
)
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamTimeout, UpstreamTooSlow
from proxy.upstream.body import BodyReader, RateFloor
from proxy.upstream.client import TAKEOVER_MIN_BYTES, UpstreamClient, UpstreamResponse
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

MIB = 1024 * 1024
LAYER = bytes((i * 7 + i // 251) & 0xFF for i in range(2 * MIB + 333))
# A floor a drip of a few bytes a tenth of a second fails within one short window.
FLOOR = {"min_rate": 64 * 1024.0, "min_rate_window": 0.5}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ---- the floor itself -----------------------------------------------------------------


def test_rate_floor_judges_only_a_whole_window_of_waiting() -> None:
    floor = RateFloor(min_rate=1000, window=2.0)
    floor.waited(1.9, received=10)  # not a whole window yet: nothing judged
    floor.waited(0.2, received=2100)  # 2100 bytes in 2.1 s of waiting: 1000 B/s met
    floor.waited(1.9, received=2100)
    with pytest.raises(UpstreamTooSlow) as refused:
        floor.waited(0.2, received=2200)  # 100 bytes in the next 2.1 s
    assert isinstance(refused.value, UpstreamTimeout)  # answered 504, like a stall
    assert "minRate" in refused.value.message


def test_rate_floor_counts_bytes_that_came_without_waiting() -> None:
    # A body that mostly arrives faster than it is read adds bytes, not waiting.
    floor = RateFloor(min_rate=1000, window=1.0)
    floor.waited(0.1, received=50 * MIB)
    floor.waited(0.95, received=50 * MIB)
    floor.waited(0.5, received=50 * MIB + 2000)


# ---- config ---------------------------------------------------------------------------


def test_min_rate_parses_on_timeouts_upstreams_and_transports(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {
                "timeouts": {"connect": 5, "read": 60, "minRate": "32K", "minRateWindow": 20},
                "defaultUpstream": REGISTRY,
                "upstreams": {
                    REGISTRY: {
                        "url": "https://registry.example.test",
                        "minRate": 0,
                        "transports": [
                            {"name": "peer", "url": "http://127.0.0.1:30020", "minRate": 1048576},
                            {"name": "other", "url": "http://127.0.0.1:30021"},
                        ],
                    },
                    "other.example.test": {"url": "https://other.example.test"},
                },
            }
        )
    )
    config = load_config_file(path)
    assert (config.timeouts.min_rate, config.timeouts.min_rate_window) == (32 * 1024, 20)
    upstream = config.upstreams[REGISTRY]
    assert upstream.min_rate == 0  # off for this origin
    assert upstream.min_rate_window is None  # the timeouts' window
    peer, other = upstream.transports
    assert (peer.min_rate, peer.min_rate_window) == (1048576, DEFAULT_MIN_RATE_WINDOW)
    assert (other.min_rate, other.min_rate_window) == (DEFAULT_MIN_RATE, DEFAULT_MIN_RATE_WINDOW)
    assert config.upstreams["other.example.test"].min_rate is None
    assert Config().timeouts.min_rate == DEFAULT_MIN_RATE > 0  # on by default


@pytest.mark.parametrize(
    "entry",
    [
        {"minRate": -1},
        {"minRate": "fast"},
        {"minRate": True},
        {"minRateWindow": 0},
        {"minRateWindow": 100000},
        {"minRateWindow": "30s"},
        {"minRate": "1e400"},
        {"minRate": "infK"},
    ],
    ids=[
        "negative",
        "word",
        "bool",
        "zero-window",
        "window-over-a-day",
        "window-string",
        "overflowing-size",
        "infinite-size",
    ],
)
def test_refuses_unusable_min_rate_settings(tmp_path: Path, entry: dict[str, object]) -> None:
    for doc in (
        {"timeouts": entry},
        {
            "defaultUpstream": REGISTRY,
            "upstreams": {REGISTRY: {"url": "https://registry.example.test", **entry}},
        },
        {
            "defaultUpstream": REGISTRY,
            "upstreams": {
                REGISTRY: {
                    "url": "https://registry.example.test",
                    "transports": [{"url": "http://127.0.0.1:30020", **entry}],
                }
            },
        },
    ):
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(doc))
        with pytest.raises(ConfigError, match="minRate"):
            load_config_file(path)


# ---- body readers ---------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """A raw HTTP/1.1 server on loopback, answering with whatever a test writes."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            try:
                await handler(reader, writer)
            except ConnectionError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/blob"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _drain(body: BodyReader, *, pause: float = 0.0) -> int:
    view = memoryview(bytearray(256 * 1024))
    total = 0
    while count := body.readinto(view):
        total += count
        if pause:
            time.sleep(pause)  # a slow client or disk: the reader's time, not the upstream's
    return total


def _dripping(length: int, *, fast: int, chunked: bool) -> Handler:
    """Send ``fast`` bytes at once, then 4 bytes every 50 ms (each far inside any read
    timeout), for at most 30 s."""

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
        writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())

        def piece(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

        writer.write(piece(b"x" * fast))
        await writer.drain()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            writer.write(piece(b"drip"))
            await writer.drain()

    return answer


@pytest.mark.parametrize("chunked", [False, True], ids=["socket", "loop"])
async def test_refuses_body_dripping_below_the_minimum_rate(
    serve: Callable[[Handler], Awaitable[str]], chunked: bool
) -> None:
    length = 4 * TAKEOVER_MIN_BYTES
    url = await serve(_dripping(length, fast=TAKEOVER_MIN_BYTES + 1000, chunked=chunked))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        response = UpstreamResponse(
            await session.get(url), idle_timeout=10.0, min_rate=64 * 1024, min_rate_window=0.5
        )
        try:
            body = response.body_reader()
            with pytest.raises(UpstreamTooSlow) as refused:
                await asyncio.wait_for(asyncio.to_thread(_drain, body), 20)
            # Cut by the floor (the drip never hits the 10 s idle timeout).
            assert "below the minimum rate" in refused.value.message
        finally:
            response.close()


def _fast_client(session: aiohttp.ClientSession, url: str) -> UpstreamClient:
    """A client of ``url`` with 1 s timeouts (headers within 2 s) and no retries."""
    return UpstreamClient(
        config=UpstreamConfig(name="drip.example.test", url=url),
        session=session,
        credentials=None,
        timeouts=TimeoutConfig(connect=1, read=1),
        retries=RetryConfig(attempts=1, backoff=0.01, max_backoff=0.01),
        metrics=Metrics(),
    )


async def test_refuses_response_headers_dripped_inside_the_read_timeout(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """``sock_read`` restarts with every byte: headers trickled a byte at a time just
    inside it would hold the request for hours. They get connect + read, no more."""

    async def drip_headers(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            writer.write(b"X-Drip: y\r\n"[:1])
            await writer.drain()

    url = await serve(drip_headers)
    async with aiohttp.ClientSession() as session:
        client = _fast_client(session, url.removesuffix("/blob"))
        with pytest.raises(UpstreamTimeout) as refused:
            await asyncio.wait_for(client.get("/v2/", scope=""), 20)
    assert "no complete response headers within 2s" in refused.value.message


async def test_refuses_token_response_dripped_inside_the_read_timeout() -> None:
    """The token service of a Bearer challenge gets connect + read for its whole
    (small) answer: a token body trickled inside the read timeout is cut."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        port = writer.get_extra_info("sockname")[1]
        try:
            if not head.startswith(b"GET /token"):
                challenge = f'Bearer realm="http://127.0.0.1:{port}/token",service="drip"'
                writer.write(
                    f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n{")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with aiohttp.ClientSession() as session:
            client = _fast_client(session, url)
            with pytest.raises(UpstreamTimeout) as refused:
                await asyncio.wait_for(client.get("/v2/", scope="repository:a:pull"), 20)
        assert "fetching a token" in refused.value.message
    finally:
        server.close()
        await server.wait_closed()


async def test_a_slow_reader_is_not_blamed_on_a_fast_upstream(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    data = b"y" * (3 * MIB)

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        writer.write(data)
        await writer.drain()

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # 1 GB/s asked over windows of 0.2 s; the reader takes 0.1 s per 256 KiB piece
        # (2.5 MB/s), far slower than the floor, but it is never waiting for the upstream.
        response = UpstreamResponse(
            await session.get(await serve(answer)),
            idle_timeout=10.0,
            min_rate=1e9,
            min_rate_window=0.2,
        )
        try:
            body = response.body_reader()
            total = await asyncio.wait_for(asyncio.to_thread(_drain, body, pause=0.1), 30)
        finally:
            response.close()
    assert total == len(data)


# ---- the mirror: drips --------------------------------------------------------------


@dataclass
class FaultyRegistry(FakeRegistry):
    """A fake registry whose blob answers can be framed wrong or dripped:

    - ``drip``: digest -> bytes sent at once, then 4 bytes every 50 ms (at most 30 s);
    - ``lie``: digest -> bytes added to the announced Content-Length (the body is cut
      or padded to match, so only the length is wrong);
    - ``overrun``: digest -> bytes appended to a body sent without a length.
    """

    drip: dict[Digest, int] = field(default_factory=dict)
    lie: dict[Digest, int] = field(default_factory=dict)
    overrun: dict[Digest, int] = field(default_factory=dict)
    dripping: int = 0
    drips_ended: int = 0

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def faults(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            digest = request.path.rsplit("/", 1)[-1]
            if "/blobs/" not in request.path or request.method not in ("GET", "HEAD"):
                return await handler(request)
            key = Digest.parse(digest)
            body = self.blobs.get(key)
            if body is None or key not in (*self.drip, *self.lie, *self.overrun):
                return await handler(request)
            self._record(request)
            response = web.StreamResponse(headers={"Docker-Content-Digest": digest})
            if request.method == "HEAD":
                response.content_length = len(body) + self.lie.get(key, 0)
                await response.prepare(request)
                await response.write_eof()
                return response
            if key in self.overrun:
                response.enable_chunked_encoding()
                await response.prepare(request)
                await response.write(body + b"\0" * self.overrun[key])
            elif key in self.lie:
                announced = len(body) + self.lie[key]
                response.content_length = announced
                await response.prepare(request)
                await response.write(body[:announced] + b"\0" * max(0, announced - len(body)))
            else:
                response.content_length = len(body)
                await response.prepare(request)
                await self._drip(response, body, self.drip[key])
            await response.write_eof()
            return response

        app.middlewares.append(faults)
        return app

    async def _drip(self, response: web.StreamResponse, body: bytes, fast: int) -> None:
        self.dripping += 1
        try:
            await response.write(body[:fast])
            deadline = time.monotonic() + 30
            for start in range(fast, len(body), 4):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
                await response.write(body[start : start + 4])
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.drips_ended += 1


@pytest.fixture
def origin() -> FaultyRegistry:
    return FaultyRegistry()


@pytest.fixture
def image(origin: FaultyRegistry) -> Image:
    return origin.add_image("app/web", "1.0", LAYER, b"second layer")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_APP_POLICY)
    return path


@pytest.fixture(params=["uncached", "cached"])
def cache_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path / "cache" if request.param == "cached" else None


def bounded_config(
    origin_url: str,
    *,
    policy: Path | None,
    cache_dir: Path | None,
    transports: tuple[TransportConfig, ...] = (),
) -> Config:
    config = mirror_config(origin_url, policy=policy, cache_dir=cache_dir)
    upstream = replace(config.upstreams[REGISTRY], transports=transports)
    timeouts = replace(config.timeouts, min_rate=64 * 1024.0, min_rate_window=0.5)
    return replace(config, upstreams={REGISTRY: upstream}, timeouts=timeouts)


def sample(mirror: Mirror, name: str, **labels: str) -> float:
    return mirror.metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class Pulled:
    status: int
    body: bytes
    cut: bool
    headers: dict[str, str]


async def pull_blob(
    mirror: Mirror, image: Image, digest: Digest, *, manifest: bool = True
) -> Pulled:
    """Pull the manifest by tag (it allows its blobs and gives their sizes), then one
    blob: what arrived, and whether the connection was cut."""
    if manifest:
        response = await mirror.client.get(f"/v2/{image.repository}/manifests/{image.tag}")
        assert response.status == 200
    response = await mirror.client.get(f"/v2/{image.repository}/blobs/{digest}")
    received = bytearray()
    try:
        async for piece in response.content.iter_any():
            received += piece
    except aiohttp.ClientPayloadError:
        return Pulled(response.status, bytes(received), True, dict(response.headers))
    return Pulled(response.status, bytes(received), False, dict(response.headers))


def blob_gets(registry: FakeRegistry, digest: Digest) -> int:
    return sum(
        1 for s in registry.requests_for("blobs") if s.method == "GET" and str(digest) in s.path
    )


async def test_refuses_transport_dripping_its_body(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    dripper = FaultyRegistry()
    dripper.blobs.update(origin.blobs)
    layer = image.layers[0]
    dripper.drip[layer] = 256 * 1024
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(dripper) as dripper_url,
    ):
        peer = TransportConfig(name="dripper", url=dripper_url, read=10.0, bad_for=600, **FLOOR)
        config = bounded_config(
            origin_url, policy=policy_file, cache_dir=cache_dir, transports=(peer,)
        )
        async with start_mirror(config) as mirror:
            first = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
            # Cut like any broken body: never a complete one, nothing cached.
            assert first.cut
            assert len(first.body) < len(LAYER)
            assert mirror.pipeline.store.path_of(layer) is None
            marked = {"registry": REGISTRY, "transport": "dripper", "reason": "slow"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **marked) == 1
            refused = {"registry": REGISTRY, "source": "dripper", "reason": "slow"}
            assert sample(mirror, "pullgate_upstream_bodies_refused_total", **refused) == 1
            # The next pull skips the dripping transport: the origin serves it whole.
            second = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
            assert (second.status, second.cut) == (200, False)
            assert Digest.of(second.body) == layer
            assert blob_gets(dripper, layer) == 1
            assert blob_gets(origin, layer) == 1
    # The dripping answer was abandoned, not left running.
    assert dripper.drips_ended == dripper.dripping == 1


async def test_refuses_origin_dripping_its_body(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    layer = image.layers[0]
    origin.drip[layer] = 256 * 1024
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            pulled = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
            assert pulled.cut
            assert len(pulled.body) < len(LAYER)
            assert mirror.pipeline.store.path_of(layer) is None
            assert len(mirror.pipeline.fills) == 0  # no fill (nor its slot) left behind
            refused = {"registry": REGISTRY, "source": "origin", "reason": "slow"}
            assert sample(mirror, "pullgate_upstream_bodies_refused_total", **refused) == 1
            assert sample(mirror, "pullgate_upstream_truncated_total", registry=REGISTRY) == 1
    assert origin.drips_ended == origin.dripping == 1


async def test_an_upstreams_own_min_rate_overrides_the_timeouts_one(
    origin: FaultyRegistry, image: Image, policy_file: Path
) -> None:
    layer = image.layers[0]
    origin.drip[layer] = len(LAYER) - 240  # the last 240 bytes over about 3 s
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=None)
        # Every origin is held to 64 KiB/s, but this one turns its floor off.
        upstream = replace(config.upstreams[REGISTRY], min_rate=0.0)
        config = replace(config, upstreams={REGISTRY: upstream})
        async with start_mirror(config) as mirror:
            pulled = await asyncio.wait_for(pull_blob(mirror, image, layer), 20)
            assert (pulled.status, pulled.cut) == (200, False)
            assert Digest.of(pulled.body) == layer


# ---- the mirror: lengths ------------------------------------------------------------


@pytest.mark.parametrize("delta", [1000, -1000], ids=["longer", "shorter"])
async def test_refuses_blob_whose_content_length_differs_from_the_manifest(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None, delta: int
) -> None:
    layer = image.layers[0]
    origin.lie[layer] = delta
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            pulled = await pull_blob(mirror, image, layer)
            # Refused before a byte of the body went out: an OCI error, not a cut.
            assert pulled.status == 502
            assert not pulled.cut
            error = json.loads(pulled.body)["errors"][0]
            assert error["code"] == "UPSTREAM_ERROR"
            assert str(len(LAYER) + delta) in error["message"]
            assert str(len(LAYER)) in error["message"]
            assert mirror.pipeline.store.path_of(layer) is None
            refused = {"registry": REGISTRY, "source": "origin", "reason": "length"}
            assert sample(mirror, "pullgate_upstream_bodies_refused_total", **refused) >= 1
            # The HEAD answer is held to the same size.
            head = await mirror.client.head(f"/v2/{image.repository}/blobs/{layer}")
            assert head.status == 502


async def test_refuses_transport_whose_content_length_differs_from_the_manifest(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    liar = FaultyRegistry()
    liar.blobs.update(origin.blobs)
    layer = image.layers[0]
    liar.lie[layer] = -len(LAYER) // 2
    async with (
        serve_fake_registry(origin) as origin_url,
        serve_fake_registry(liar) as liar_url,
    ):
        peer = TransportConfig(name="liar", url=liar_url, bad_for=600)
        config = bounded_config(
            origin_url, policy=policy_file, cache_dir=cache_dir, transports=(peer,)
        )
        async with start_mirror(config) as mirror:
            # Skipped before a byte is read, and the origin answers this very pull.
            for _ in range(2):
                pulled = await pull_blob(mirror, image, layer)
                assert (pulled.status, pulled.cut) == (200, False)
                assert Digest.of(pulled.body) == layer
            assert blob_gets(liar, layer) == 1
            marked = {"registry": REGISTRY, "transport": "liar", "reason": "length"}
            assert sample(mirror, "pullgate_transport_marked_bad_total", **marked) == 1
            failover = {"registry": REGISTRY, "transport": "liar", "reason": "length"}
            assert sample(mirror, "pullgate_transport_failovers_total", **failover) == 1


async def test_refuses_body_without_a_length_running_past_the_manifest_size(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    layer = image.layers[0]
    origin.overrun[layer] = 64 * 1024
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            pulled = await pull_blob(mirror, image, layer)
            # The client was told the verified size, and the body was cut past it.
            assert pulled.headers.get("Content-Length") == str(len(LAYER))
            assert pulled.cut
            assert len(pulled.body) < len(LAYER)
            assert mirror.pipeline.store.path_of(layer) is None


async def test_an_honest_body_without_a_length_is_served_with_the_verified_size(
    origin: FaultyRegistry, image: Image, policy_file: Path
) -> None:
    layer = image.layers[0]
    origin.overrun[layer] = 0  # chunked, and exactly the blob
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=None)
        async with start_mirror(config) as mirror:
            pulled = await pull_blob(mirror, image, layer)
            assert (pulled.status, pulled.cut) == (200, False)
            assert pulled.headers.get("Content-Length") == str(len(LAYER))
            assert Digest.of(pulled.body) == layer


async def test_without_a_known_size_the_upstream_length_bounds_the_body(
    origin: FaultyRegistry, image: Image
) -> None:
    # Allow-all (no policy) and the manifest never passed here: no verified size, so
    # the upstream's own length is the bound, as before (a lie is caught by the digest).
    layer = image.layers[0]
    origin.lie[layer] = -1000
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=None, cache_dir=None)
        async with start_mirror(config) as mirror:
            pulled = await pull_blob(mirror, image, layer, manifest=False)
            assert pulled.status == 200
            assert pulled.cut or Digest.of(pulled.body) != layer
            assert len(pulled.body) < len(LAYER)


def disagreeing_manifest(origin: FaultyRegistry, image: Image, tag: str, extra: int) -> None:
    """A second manifest in the image's repository naming its first layer with
    ``extra`` bytes more than the first one gives it (a co-tenant, or a scope that
    serves unsigned manifests, allows it too)."""
    doc = json.loads(image.manifest)
    doc["layers"][0]["size"] += extra
    raw = json.dumps(doc).encode()
    origin.add_manifest(image.repository, raw, doc["mediaType"], tag=tag)


async def pull_manifest(mirror: Mirror, repository: str, tag: str) -> None:
    response = await mirror.client.get(f"/v2/{repository}/manifests/{tag}")
    assert response.status == 200
    await response.read()


async def test_refuses_length_no_served_manifest_gives_when_two_manifests_disagree(
    origin: FaultyRegistry, image: Image, policy_file: Path, cache_dir: Path | None
) -> None:
    # Two allowed manifests of the repository give the layer different sizes. That
    # must not lift the bound: a length neither of them gives is refused as before.
    layer = image.layers[0]
    disagreeing_manifest(origin, image, "other", 1)
    origin.lie[layer] = 64 * 1024
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            await pull_manifest(mirror, image.repository, "other")
            pulled = await pull_blob(mirror, image, layer)
            assert (pulled.status, pulled.cut) == (502, False)
            error = json.loads(pulled.body)["errors"][0]
            assert error["code"] == "UPSTREAM_ERROR"
            assert str(len(LAYER) + 64 * 1024) in error["message"]
            assert f"{len(LAYER)} or {len(LAYER) + 1} bytes" in error["message"]
            assert mirror.pipeline.store.path_of(layer) is None
            head = await mirror.client.head(f"/v2/{image.repository}/blobs/{layer}")
            assert head.status == 502


async def test_refuses_body_without_a_length_past_every_size_disagreeing_manifests_give(
    origin: FaultyRegistry, image: Image, policy_file: Path
) -> None:
    layer = image.layers[0]
    disagreeing_manifest(origin, image, "other", 1)
    origin.overrun[layer] = 64 * 1024
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=None)
        async with start_mirror(config) as mirror:
            await pull_manifest(mirror, image.repository, "other")
            pulled = await pull_blob(mirror, image, layer)
            # Bound to the largest size a served manifest gives it, and cut past it.
            assert pulled.headers.get("Content-Length") == str(len(LAYER) + 1)
            assert pulled.cut
            assert len(pulled.body) <= len(LAYER) + 1


async def test_an_honest_length_is_served_when_two_manifests_disagree(
    origin: FaultyRegistry, image: Image, policy_file: Path
) -> None:
    layer = image.layers[0]
    disagreeing_manifest(origin, image, "other", 4096)
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=policy_file, cache_dir=None)
        async with start_mirror(config) as mirror:
            await pull_manifest(mirror, image.repository, "other")
            pulled = await pull_blob(mirror, image, layer)
            assert (pulled.status, pulled.cut) == (200, False)
            assert Digest.of(pulled.body) == layer


async def test_refuses_blob_without_any_length_instead_of_hanging(
    origin: FaultyRegistry, image: Image, cache_dir: Path | None
) -> None:
    """Allow-all, the manifest never passed here, and an honest chunked body: nothing
    says where the blob ends. It was streamed with no framing the client could use, and
    the client waited forever; now it is a clear 502 before any byte."""
    layer = image.layers[0]
    origin.overrun[layer] = 0  # chunked, exactly the blob
    async with serve_fake_registry(origin) as origin_url:
        config = bounded_config(origin_url, policy=None, cache_dir=cache_dir)
        async with start_mirror(config) as mirror:
            pulled = await asyncio.wait_for(pull_blob(mirror, image, layer, manifest=False), 20)
    assert pulled.status == 502
    error = json.loads(pulled.body)["errors"][0]
    assert error["code"] == "UPSTREAM_ERROR"
    assert "without a Content-Length" in error["message"]
