"""The mirror in process: a fake upstream registry and the app wired as ``serve`` wires it.

``FakeRegistry`` is a small aiohttp server on loopback that speaks enough of the OCI
distribution API (``/v2/``, manifests, blobs, tags/list) for the front end and the
pipeline, and records what it was asked. ``start_mirror`` is the one place these tests
wire gate, store, pipeline, router and app together (through ``proxy.node``, as
``pullgate serve`` does).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.cache import BlobStore
from proxy.cache.verified import VerifiedManifestStore
from proxy.config import CacheConfig, Config, RetryConfig, TimeoutConfig, UpstreamConfig, validate
from proxy.http.app import ROUTER_KEY, build_app
from proxy.metrics import Metrics
from proxy.node import Node
from proxy.oci.digest import Digest
from proxy.pipeline import Pipeline
from proxy.pipeline.gate import Gate
from proxy.upstream.router import Route

REGISTRY = "registry.example.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# Everything under REGISTRY/app/** is served (mode allow, no signature required); the
# default refuses the rest. Blobs are still allowed only through a manifest.
ALLOW_APP_POLICY = f"""\
default: deny
scopes:
  - match: "{REGISTRY}/app/**"
    mode: allow
"""


@dataclass(frozen=True, slots=True)
class Image:
    repository: str
    tag: str
    manifest: bytes
    digest: Digest
    config: Digest
    layers: tuple[Digest, ...]


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    query_string: str


@dataclass
class FakeRegistry:
    """An upstream registry in memory. ``corrupt`` blobs are served with one byte
    flipped (same length, so only the digest check can tell); bodies go out in
    ``chunk``-sized writes so a client sees them arrive piece by piece."""

    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[Digest, bytes] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    corrupt: set[Digest] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    chunk: int = 64 * 1024
    referrers_api: bool = False
    """Answer ``GET /v2/<name>/referrers/<digest>`` (OCI 1.1, ``artifactType`` filter);
    off: 404, as Debian's docker-registry does."""
    referrers_filter: bool = True
    """Whether the referrers API applies ``artifactType`` (the spec lets it ignore it)."""

    def add_manifest(self, repository: str, raw: bytes, media_type: str, tag: str = "") -> Digest:
        """Store a manifest by digest (and ``tag``); returns its digest."""
        digest = Digest.of(raw)
        for reference in (str(digest), tag):
            if reference:
                self.manifests[(repository, reference)] = (raw, media_type)
        return digest

    def add_image(self, repository: str, tag: str, *layers: bytes) -> Image:
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        config_digest = Digest.of(config)
        self.blobs[config_digest] = config
        layer_digests = []
        for layer in layers:
            digest = Digest.of(layer)
            self.blobs[digest] = layer
            layer_digests.append(digest)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": str(config_digest), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": str(d), "size": len(layer)}
                for d, layer in zip(layer_digests, layers, strict=True)
            ],
        }
        # Deliberately not canonical JSON: the mirror must serve these exact bytes.
        raw = json.dumps(doc, indent=3).encode() + b"\n"
        digest = Digest.of(raw)
        self.manifests[(repository, tag)] = (raw, OCI_MANIFEST)
        self.manifests[(repository, str(digest))] = (raw, OCI_MANIFEST)
        self.tags.setdefault(repository, []).append(tag)
        return Image(repository, tag, raw, digest, config_digest, tuple(layer_digests))

    def requests_for(self, kind: str) -> list[Seen]:
        """Recorded requests whose path contains ``/<kind>/`` (or ends in ``kind``)."""
        return [s for s in self.seen if f"/{kind}/" in s.path or s.path.endswith(kind)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/v2/{repo:.+}/tags/list", self._tags)
        if self.referrers_api:
            app.router.add_route("GET", "/v2/{repo:.+}/referrers/{digest}", self._referrers)
        return app

    def _record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(request.method, request.path, dict(request.query), request.query_string)
        )

    async def _base(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        found = self.manifests.get((request.match_info["repo"], request.match_info["ref"]))
        if found is None:
            return _oci_error(404, "MANIFEST_UNKNOWN")
        raw, media_type = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(raw))}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(raw))})
        return web.Response(body=raw, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        digest = Digest.parse(request.match_info["digest"])
        body = self.blobs.get(digest)
        if body is None:
            return _oci_error(404, "BLOB_UNKNOWN")
        if digest in self.corrupt:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        response = web.StreamResponse(headers={"Docker-Content-Digest": str(digest)})
        response.content_type = "application/octet-stream"
        response.content_length = len(body)
        await response.prepare(request)
        if request.method != "HEAD":
            for start in range(0, len(body), self.chunk):
                await response.write(body[start : start + self.chunk])
        await response.write_eof()
        return response

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo = request.match_info["repo"]
        if repo not in self.tags:
            return _oci_error(404, "NAME_UNKNOWN")
        return web.json_response({"name": repo, "tags": self.tags[repo]})

    async def _referrers(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo, subject = request.match_info["repo"], request.match_info["digest"]
        wanted = request.query.get("artifactType") if self.referrers_filter else None
        listed: dict[str, dict[str, object]] = {}
        for (name, _), (raw, media_type) in self.manifests.items():
            doc = json.loads(raw)
            kind = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if name != repo or (doc.get("subject") or {}).get("digest") != subject:
                continue
            if wanted is not None and kind != wanted:
                continue
            digest = str(Digest.of(raw))
            listed[digest] = {
                "mediaType": media_type,
                "digest": digest,
                "size": len(raw),
                "artifactType": kind,
            }
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(listed.values())}
        headers = {"OCI-Filters-Applied": "artifactType"} if wanted is not None else {}
        return web.json_response(body, content_type=OCI_INDEX, headers=headers)


def _oci_error(status: int, code: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": code.lower()}]}, status=status)


@asynccontextmanager
async def serve_fake_registry(registry: FakeRegistry) -> AsyncIterator[str]:
    """Serve ``registry`` on a free loopback port; yields its base URL."""
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def mirror_config(
    upstream_url: str, *, policy: Path | None = None, cache_dir: Path | None = None
) -> Config:
    """A config routing ``REGISTRY`` (also the default) to ``upstream_url``; one
    attempt per upstream request, so an unreachable upstream fails at once."""
    return validate(
        Config(
            admin_listen=None,
            upstreams={REGISTRY: UpstreamConfig(name=REGISTRY, url=upstream_url)},
            default_upstream=REGISTRY,
            unlisted_registries="deny",
            timeouts=TimeoutConfig(connect=5.0, read=10.0),
            retries=RetryConfig(attempts=1, backoff=0.0),
            policy=policy,
            cache=replace(CacheConfig(), dir=cache_dir, scrub_bytes_per_second=0),
        )
    )


@dataclass
class Mirror:
    app: web.Application
    pipeline: Pipeline
    client: TestClient[web.Request, web.Application]
    metrics: Metrics

    def route(self, ns: str | None = None) -> Route:
        return self.app[ROUTER_KEY].route(ns)


@asynccontextmanager
async def start_mirror(
    config: Config,
    *,
    gate: Gate | None = None,
    store: BlobStore | None = None,
    manifests: VerifiedManifestStore | None = None,
) -> AsyncIterator[Mirror]:
    """The app wired as ``pullgate serve`` wires it (``proxy.node``), served on loopback
    with aiohttp's test client; ``gate``, ``store`` and ``manifests`` replace what the
    config would build. The upstream session and router live as long as the node runs, so they exist
    (``Mirror.route``) only inside this context."""
    node = Node.build(config, gate=gate, store=store, manifests=manifests)
    async with node.running():
        app = build_app(
            config=config, pipeline=node.pipeline, router=node.router, metrics=node.metrics
        )
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield Mirror(app=app, pipeline=node.pipeline, client=client, metrics=node.metrics)
