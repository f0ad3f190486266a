"""The private-repository rule (``proxy.pipeline.access``) in process.

A small upstream on loopback keeps one repository behind Basic auth and one open;
the rule runs against it through the mirror's real router and upstream clients.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import proxy.pipeline.access as access_module
from proxy.metrics import Metrics
from proxy.oci.errors import CredentialsRequired, Denied, UpstreamError
from proxy.pipeline.access import GRANT_USER, PullGrant, PullGrants, RepositoryAccess
from proxy.pipeline.gate import Pod
from proxy.upstream.auth import Credentials, pull_scope, requester_credentials
from proxy.upstream.router import Route
from tests.support.inprocess import Mirror, mirror_config, start_mirror

ALICE = Credentials("alice", "s3cret")
MALLORY = Credentials("alice", "guess")


@dataclass
class Upstream:
    """``team/secret`` needs alice's password; ``team/open`` does not."""

    private: set[str] = field(default_factory=lambda: {"team/secret"})
    down: bool = False
    delay: float = 0.0
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        repo = request.match_info["repo"]
        auth = request.headers.get("Authorization")
        self.seen.append((request.method, repo, auth))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise web.HTTPServiceUnavailable(text="down for maintenance")
        if repo in self.private and auth != ALICE.basic_header():
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="test"'},
            )
        return web.Response(body=b"{}", content_type="application/vnd.oci.image.manifest.v1+json")

    def checks(self, auth: str | None) -> int:
        """HEADs the upstream saw, sent with ``auth``."""
        return sum(1 for method, _, sent in self.seen if method == "HEAD" and sent == auth)


@dataclass
class Setup:
    upstream: Upstream
    mirror: Mirror
    access: RepositoryAccess
    marks: Path

    def route(self) -> Route:
        return self.mirror.route()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/v2/{repo:.+}/manifests/{ref}", upstream.manifest)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with start_mirror(mirror_config(url)) as mirror:
            marks = tmp_path / "private"
            yield Setup(
                upstream, mirror, RepositoryAccess(marks_dir=marks, metrics=Metrics()), marks
            )
    finally:
        await server.close()


async def _fetch(setup: Setup, repository: str) -> Credentials | None:
    """What a pipeline call does: read the repository upstream, as the request acts.
    Returns whom it acted as."""
    route = setup.route()
    response = await route.client.get(
        f"/v2/{repository}/manifests/v1", scope=pull_scope(repository)
    )
    response.close()
    return requester_credentials()


async def _guard(setup: Setup, repository: str, credentials: Credentials | None) -> object:
    return await setup.access.guard(
        setup.route(),
        repository,
        "manifests/v1",
        credentials,
        lambda: _fetch(setup, repository),
    )


async def test_a_repository_the_node_reads_is_served_as_the_node_without_a_check(
    setup: Setup,
) -> None:
    assert await _guard(setup, "team/open", None) is None
    assert await _guard(setup, "team/open", ALICE) is None  # the node's identity serves it
    assert setup.upstream.checks(None) == 0 and setup.upstream.checks(ALICE.basic_header()) == 0
    assert list(setup.marks.iterdir()) == []


async def test_refuses_a_private_repository_to_a_request_without_credentials(
    setup: Setup,
) -> None:
    with pytest.raises(CredentialsRequired) as refused:
        await _guard(setup, "team/secret", None)
    assert "team/secret is private" in refused.value.message
    assert "carried no credentials" in refused.value.message
    assert len(list(setup.marks.iterdir())) == 1  # marked, for this and later processes


async def test_refuses_a_private_repository_to_wrong_credentials_with_the_upstreams_reason(
    setup: Setup,
) -> None:
    with pytest.raises(Denied) as refused:
        await _guard(setup, "team/secret", MALLORY)
    assert "refused the request's credentials" in refused.value.message
    assert "requires" in refused.value.message  # the upstream's reason travels along
    assert setup.upstream.checks(MALLORY.basic_header()) == 1


async def test_right_credentials_are_checked_once_then_acted_as_within_the_ttl(
    setup: Setup,
) -> None:
    assert await _guard(setup, "team/secret", ALICE) == ALICE
    assert setup.upstream.checks(ALICE.basic_header()) == 1
    assert await _guard(setup, "team/secret", ALICE) == ALICE
    assert setup.upstream.checks(ALICE.basic_header()) == 1, "the accepted check is remembered"
    # Someone else, later, without credentials: still refused, whatever is cached.
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)


async def test_concurrent_checks_share_one_probe_that_a_departed_request_does_not_cancel(
    setup: Setup,
) -> None:
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)  # marked private
    setup.upstream.delay = 0.2
    first = asyncio.ensure_future(_guard(setup, "team/secret", ALICE))
    second = asyncio.ensure_future(_guard(setup, "team/secret", ALICE))
    await asyncio.sleep(0.05)
    first.cancel()  # its client went away mid-check
    assert await second == ALICE
    assert first.cancelled()
    # One HEAD for both (the single flight), then the fetch as alice.
    assert setup.upstream.checks(ALICE.basic_header()) == 1


async def test_refuses_a_private_repository_after_a_restart_without_asking_the_upstream(
    setup: Setup,
) -> None:
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)
    restarted = RepositoryAccess(marks_dir=setup.marks, metrics=Metrics())
    setup.upstream.seen.clear()

    async def cached() -> None:  # a cache hit: no upstream request of its own
        raise AssertionError("a private repository is not served without credentials")

    with pytest.raises(CredentialsRequired):
        await restarted.guard(setup.route(), "team/secret", "manifests/v1", None, cached)
    assert setup.upstream.seen == []


async def test_refuses_a_private_repository_while_the_upstream_cannot_check_credentials(
    setup: Setup,
) -> None:
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)
    setup.upstream.down = True

    async def cached() -> str:
        return "served from the cache"

    route = setup.route()
    with pytest.raises(UpstreamError) as refused:
        await setup.access.guard(route, "team/secret", "manifests/v1", ALICE, cached)
    assert "503" in refused.value.message
    # A repository nothing marked private is served from the cache as before.
    assert await setup.access.guard(route, "team/open", "manifests/v1", None, cached) == (
        "served from the cache"
    )


async def test_a_private_repository_made_public_opens_again_after_the_recheck(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)
    setup.upstream.private.clear()
    monkeypatch.setattr(access_module, "MARK_RECHECK", 0.0)
    assert await _guard(setup, "team/secret", None) is None
    assert list(setup.marks.iterdir()) == []


async def test_refuses_a_private_repository_forgotten_in_memory_by_a_flood_of_marks(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client on the mirror port can have any number of repositories marked private
    # (one refused request each). Memory keeps the most recent marks only; one it
    # dropped is read back from its file, so it is refused all the same.
    monkeypatch.setattr(access_module, "MAX_PRIVATE_IN_MEMORY", 4)
    flood = [f"flood/r{i}" for i in range(12)]
    setup.upstream.private.update(flood)
    for repository in ["team/secret", *flood]:
        with pytest.raises(CredentialsRequired):
            await _guard(setup, repository, None)
    assert len(setup.access._private) <= 4
    assert len(list(setup.marks.iterdir())) == 13
    setup.upstream.seen.clear()

    async def cached() -> None:  # a cache hit: no upstream request of its own
        raise AssertionError("a private repository is not served without credentials")

    with pytest.raises(CredentialsRequired):
        await setup.access.guard(setup.route(), "team/secret", "manifests/v1", None, cached)
    assert setup.upstream.seen == []
    assert len(setup.access._private) <= 4


async def test_refuses_a_private_repository_whose_mark_the_full_disk_did_not_take(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flood above could also fill the disk: a mark that cannot be written stays in
    # memory, however many marks come after it.
    monkeypatch.setattr(access_module, "MAX_PRIVATE_IN_MEMORY", 2)
    touch = Path.touch

    def full_disk(path: Path, *args: object, **kwargs: object) -> None:
        if not setup.upstream.seen or setup.upstream.seen[-1][1] == "team/secret":
            raise OSError(28, "No space left on device")
        touch(path)

    monkeypatch.setattr(Path, "touch", full_disk)
    with pytest.raises(CredentialsRequired):
        await _guard(setup, "team/secret", None)
    assert list(setup.marks.iterdir()) == []
    flood = [f"flood/r{i}" for i in range(6)]
    setup.upstream.private.update(flood)
    for repository in flood:
        with pytest.raises(CredentialsRequired):
            await _guard(setup, repository, None)

    async def cached() -> None:
        raise AssertionError("a private repository is not served without credentials")

    with pytest.raises(CredentialsRequired):
        await setup.access.guard(setup.route(), "team/secret", "manifests/v1", None, cached)


def test_credentials_never_print_their_secret() -> None:
    text = repr(Credentials("alice", "s3cret", identity_token="tok"))
    assert "s3cret" not in text and "tok" not in text and "alice" in text
    assert base64.b64encode(b"alice:s3cret").decode() not in text


GRANT = PullGrant(
    registry="registry.example.test",
    repository="team/secret",
    digest="sha256:" + "a" * 64,
    pod=Pod.of("ml-dev", {"team": "research"}),
    credentials=ALICE,
)


def test_a_sealed_pull_grant_opens_to_what_the_cri_front_end_decided() -> None:
    grants = PullGrants(os.urandom(32))
    sealed = grants.seal(GRANT)
    assert sealed.username == GRANT_USER
    assert "s3cret" not in sealed.password and "ml-dev" not in sealed.password
    assert grants.open(sealed) == GRANT
    assert grants.open(ALICE) is None  # ordinary credentials are not a grant
    assert grants.open(None) is None
    anonymous = dataclasses.replace(GRANT, pod=None, credentials=None)
    assert grants.open(grants.seal(anonymous)) == anonymous


@pytest.mark.parametrize(
    "forge",
    [
        lambda sealed, _: Credentials(GRANT_USER, sealed.password[:-4] + "AAAA"),
        lambda sealed, _: Credentials(GRANT_USER, "not base64 at all!"),
        lambda sealed, _: Credentials(GRANT_USER, ""),
        lambda _, grant: PullGrants(os.urandom(32)).seal(grant),  # another node's key
    ],
)
def test_refuses_a_pull_grant_this_node_did_not_seal(
    forge: Callable[[Credentials, PullGrant], Credentials],
) -> None:
    grants = PullGrants(os.urandom(32))
    with pytest.raises(Denied, match="not one this node issued"):
        grants.open(forge(grants.seal(GRANT), GRANT))


def test_refuses_an_expired_pull_grant() -> None:
    grants = PullGrants(os.urandom(32))
    with pytest.raises(Denied, match="expired"):
        grants.open(grants.seal(GRANT, ttl=-1))
