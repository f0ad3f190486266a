"""Upstream auth: challenges, the credential trust boundary, node credentials, and the
client's token flow against real local HTTP servers."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Config, RetryConfig, TimeoutConfig, UpstreamConfig
from proxy.metrics import Metrics
from proxy.oci.errors import Unauthorized, UpstreamError, UpstreamUnavailable
from proxy.upstream.auth import (
    Credentials,
    acting_as,
    load_docker_config,
    parse_challenge,
    realm_is_trusted,
)
from proxy.upstream.client import REQUESTER_TOKEN_SECONDS, UpstreamClient
from proxy.upstream.router import UpstreamRouter


def test_parses_bearer_challenge_parameters() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.example.test/token",service="registry",scope="repository:a:pull"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example.test/token"
    assert challenge.params["scope"] == "repository:a:pull"
    assert parse_challenge("Negotiate abc") is None
    assert parse_challenge(None) is None


@pytest.mark.parametrize(
    ("realm", "trusted"),
    [
        ("https://registry.example.test/token", True),
        ("https://auth.example.test/token", True),  # listed by the operator
        ("https://evil.example.test/token", False),
        ("http://registry.example.test/token", False),  # https downgraded
        ("https://user:pw@registry.example.test/token", False),
        ("file:///etc/passwd", False),
        ("not a url", False),
    ],
)
def test_refuses_to_trust_token_realm_outside_the_boundary(realm: str, trusted: bool) -> None:
    assert (
        realm_is_trusted(realm, "https://registry.example.test", ("auth.example.test",)) is trusted
    )


def test_reads_node_credentials_from_docker_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    auth = base64.b64encode(b"alice:s3cret").decode()
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "registry.example.test": {"username": "bob", "password": "pw"},
                    "broken.example.test": {"auth": "!!!"},
                }
            }
        )
    )
    creds = load_docker_config(path)
    assert creds["docker.io"] == Credentials("alice", "s3cret")
    assert creds["registry.example.test"] == Credentials("bob", "pw")
    assert "broken.example.test" not in creds


class FakeRegistry:
    """A registry that demands a bearer token from ``realm`` and records what it saw."""

    def __init__(self, realm_host: str | None = None) -> None:
        self.realm_host = realm_host
        self.token_requests: list[str | None] = []
        self.refresh_posts: list[dict[str, str]] = []
        self.failures_left = 0
        self.refuse_tokens = False  # the registry refuses every token (no access)
        self.token_lifetime = 60  # expires_in of the tokens it issues
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_post("/token", self.oauth)
        app.router.add_get("/v2/{tail:.*}", self.v2)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(request.headers.get("Authorization"))
        return web.json_response({"token": "t0k3n", "expires_in": self.token_lifetime})

    async def oauth(self, request: web.Request) -> web.Response:
        """OAuth2: an identity (refresh) token exchanged for an access token."""
        form = dict(await request.post())
        self.refresh_posts.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "r3fresh":
            return web.json_response({"error": "invalid_grant"}, status=401)
        return web.json_response({"access_token": "t0k3n", "expires_in": 300})

    async def v2(self, request: web.Request) -> web.Response:
        if self.failures_left:
            self.failures_left -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        if self.refuse_tokens or request.headers.get("Authorization") != "Bearer t0k3n":
            host = self.realm_host or f"127.0.0.1:{self.port}"
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="http://{host}/token",service="r"'},
            )
        return web.Response(body=b"ok")


async def client_for(
    server: TestServer, session: aiohttp.ClientSession, credentials: Credentials | None
) -> UpstreamClient:
    return UpstreamClient(
        config=UpstreamConfig(
            name="registry.example.test", url=str(server.make_url("")).rstrip("/")
        ),
        session=session,
        credentials=credentials,
        timeouts=TimeoutConfig(connect=2, read=2),
        retries=RetryConfig(attempts=3, backoff=0.01, max_backoff=0.05),
        metrics=Metrics(),
    )


@asynccontextmanager
async def serving(
    fake: FakeRegistry, credentials: Credentials | None
) -> AsyncIterator[UpstreamClient]:
    """``fake`` on loopback, and a client of it with node ``credentials``."""
    async with (
        TestServer(fake.app(), host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
    ):
        fake.port = server.port or 0
        yield await client_for(server, session, credentials)


async def test_anonymous_bearer_token_flow() -> None:
    fake = FakeRegistry()
    async with serving(fake, None) as client:
        async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as response:
            assert response.status == 200
        assert fake.token_requests == [None]


async def test_credentials_go_to_a_trusted_realm() -> None:
    fake = FakeRegistry()
    async with serving(fake, Credentials("alice", "s3cret")) as client:
        async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as response:
            assert response.status == 200
        assert fake.token_requests[0] == Credentials("alice", "s3cret").basic_header()


async def test_refuses_to_send_credentials_to_foreign_realm() -> None:
    realm = FakeRegistry()
    async with TestServer(realm.app(), host="127.0.0.1") as realm_server:
        # The registry points its realm at another host (localhost, not 127.0.0.1).
        fake = FakeRegistry(realm_host=f"localhost:{realm_server.port}")
        async with (
            TestServer(fake.app(), host="127.0.0.1") as server,
            aiohttp.ClientSession() as session,
        ):
            client = await client_for(server, session, Credentials("alice", "s3cret"))
            async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as r:
                assert r.status in (200, 401)
    assert realm.token_requests and all(header is None for header in realm.token_requests)


async def test_retries_5xx_with_retry_after_then_succeeds() -> None:
    fake = FakeRegistry()
    fake.failures_left = 2
    async with serving(fake, None) as client:
        async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as response:
            assert response.status == 200
        assert fake.failures_left == 0


async def test_persistent_5xx_becomes_a_clean_upstream_error() -> None:
    fake = FakeRegistry()
    fake.failures_left = 100
    async with serving(fake, None) as client:
        with pytest.raises((UpstreamError, UpstreamUnavailable)):
            response = await client.get("/v2/a/manifests/v1", scope="repository:a:pull")
            async with response:
                if response.status >= 500:
                    raise UpstreamError("still failing")
        assert fake.failures_left == 100 - 3  # bounded attempts


async def test_unreachable_upstream_is_unavailable_not_a_crash() -> None:
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(
            config=UpstreamConfig(name="r", url="http://127.0.0.1:9"),
            session=session,
            credentials=None,
            timeouts=TimeoutConfig(connect=1, read=1),
            retries=RetryConfig(attempts=2, backoff=0.01, max_backoff=0.02),
            metrics=Metrics(),
        )
        with pytest.raises((UpstreamUnavailable, Unauthorized, UpstreamError)):
            await client.get("/v2/", scope="")


async def test_a_requester_identity_token_is_exchanged_by_oauth2_for_an_access_token() -> None:
    fake = FakeRegistry()
    async with serving(fake, Credentials("node", "pw")) as client:
        with acting_as(Credentials(identity_token="r3fresh")):
            async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as r:
                assert r.status == 200
        (posted,) = fake.refresh_posts
        assert posted["grant_type"] == "refresh_token" and posted["scope"] == "repository:a:pull"
        assert fake.token_requests == []  # the node's password was not used for it
        with acting_as(Credentials(identity_token="stale")), pytest.raises(Unauthorized) as no:
            await client.get("/v2/b/manifests/v1", scope="repository:b:pull")
        assert "credentials refused" in no.value.message


async def test_a_requester_registry_token_is_sent_as_is_and_never_exchanged() -> None:
    fake = FakeRegistry()
    async with serving(fake, None) as client:
        with acting_as(Credentials(registry_token="t0k3n")):
            async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull") as r:
                assert r.status == 200
        assert fake.token_requests == [] and fake.refresh_posts == []


async def test_tokens_of_one_requester_never_serve_another_or_the_node() -> None:
    fake = FakeRegistry()
    async with serving(fake, None) as client:
        alice, bob = Credentials("alice", "a"), Credentials("bob", "b")
        for who in (alice, bob, None, alice):
            with acting_as(who):
                async with await client.get("/v2/a/manifests/v1", scope="repository:a:pull"):
                    pass
        # One token fetch per identity (alice's second request reuses hers), each
        # with that identity's own credentials.
        assert fake.token_requests == [alice.basic_header(), bob.basic_header(), None]


async def test_refuses_to_reuse_a_requesters_token_past_its_credential_check() -> None:
    """An hour-long token for a pod's credentials is kept a minute, as long as their
    check is remembered: a password revoked upstream stops working then. The node's
    own token keeps its lifetime."""
    fake = FakeRegistry()
    fake.token_lifetime = 3600
    scope = "repository:a:pull"
    async with serving(fake, None) as client:
        alice = Credentials("alice", "a")
        for who in (alice, None):
            with acting_as(who):
                async with await client.get("/v2/a/manifests/v1", scope=scope):
                    pass
        now = time.monotonic()
        left = {who: token.expires_at - now for (_, who), token in client._tokens.items()}
    assert 0 < left[alice.fingerprint] <= REQUESTER_TOKEN_SECONDS
    assert left[""] > 3000


async def test_refused_credentials_leave_no_token_state_behind() -> None:
    # Anyone on the mirror port can send credentials for a private repository, each
    # one new: a refused identity keeps nothing (no token, no lock), so memory does
    # not grow with the credentials the upstream refused.
    fake = FakeRegistry()
    async with serving(fake, None) as client:
        for attempt in range(40):
            stale = Credentials(identity_token=f"stale-{attempt}")
            with acting_as(stale), pytest.raises(Unauthorized):
                await client.get("/v2/a/manifests/v1", scope="repository:a:pull")
        assert len(fake.refresh_posts) == 40
        assert client._tokens == {} and client._token_locks == {}
        # A token the registry then refuses is dropped with its lock as well.
        fake.refuse_tokens = True
        for who in ("alice", "bob"):
            with acting_as(Credentials(who, "pw")), pytest.raises(Unauthorized):
                await client.get("/v2/a/manifests/v1", scope="repository:a:pull")
        assert client._tokens == {} and client._token_locks == {}


@pytest.mark.parametrize("content", [None, "", "{not json", '{"auths": []}'])
async def test_a_missing_or_unreadable_docker_config_means_no_node_credentials_not_no_mirror(
    tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    config = Config(
        upstreams={"registry.example.test": UpstreamConfig("registry.example.test", "http://r")},
        docker_config=path,
    )
    async with aiohttp.ClientSession() as session:
        router = UpstreamRouter(config=config, session=session, metrics=Metrics())
        client = router.route("registry.example.test").client
    assert client._identity() == (None, "")  # the node acts anonymously
    if content is None:
        assert "does not exist: no node credentials" in caplog.text
    elif content == "{not json" or content == "":
        assert "is unreadable" in caplog.text


class TlsThenPlainServer:
    """One loopback port that answers TLS with a redirect to itself over plain
    ``http://`` (same host and port, so the same netloc), and records the headers of
    every plain-text request that arrives."""

    def __init__(self, tmp_path: Path) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.ca_file = tmp_path / "origin-ca.pem"
        self.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = tmp_path / "origin-key.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self.ca_file, key_file)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self.plain_requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with conn:
                    self._answer(conn)
            except OSError:
                continue

    def _answer(self, conn: socket.socket) -> None:
        if conn.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS handshake
            with self._tls.wrap_socket(conn, server_side=True) as tls:
                _read_head(tls)
                location = f"http://127.0.0.1:{self.port}/v2/a/blobs/sha256:00"
                tls.sendall(
                    f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
            return
        self.plain_requests.append(_read_head(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _read_head(conn: socket.socket) -> str:
    head = b""
    while b"\r\n\r\n" not in head:
        piece = conn.recv(4096)
        if not piece:
            break
        head += piece
    return head.decode("latin-1")


async def test_refuses_to_send_credentials_over_a_redirect_from_https_to_plain_http(
    tmp_path: Path,
) -> None:
    server = TlsThenPlainServer(tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            client = UpstreamClient(
                config=UpstreamConfig(
                    name="registry.example.test",
                    url=f"https://127.0.0.1:{server.port}",
                    ca_file=server.ca_file,
                ),
                session=session,
                credentials=Credentials(registry_token="n0de-t0ken"),
                timeouts=TimeoutConfig(connect=2, read=5),
                retries=RetryConfig(attempts=1, backoff=0.01, max_backoff=0.05),
                metrics=Metrics(),
            )
            async with await client.get("/v2/a/blobs/sha256:00", scope="repository:a:pull"):
                pass
        # The redirect went to the same host and port, but in plain text: no token.
        (plain,) = server.plain_requests
        assert plain.startswith("GET /v2/a/blobs/sha256:00 ")
        assert "n0de-t0ken" not in plain
        assert "authorization" not in plain.lower()
    finally:
        server.close()
