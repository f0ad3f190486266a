"""Routing ``ns=<registry>`` to the configured upstream."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from proxy.config import Config, UpstreamConfig
from proxy.metrics import Metrics
from proxy.oci.errors import RegistryUnknown
from proxy.oci.reference import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    validate_registry,
    without_https_port,
)
from proxy.upstream.auth import Credentials, load_docker_config
from proxy.upstream.client import UpstreamClient
from proxy.upstream.transports import SharedMarks, TransportChain

log = logging.getLogger("pullgate.router")

# Clients kept for registries with no configured upstream (``unlistedRegistries: https``).
MAX_UNLISTED_CLIENTS = 1024
# Registries with no configured upstream named in metrics labels; the rest are "other",
# so that a pod naming registries without end cannot grow the metrics without end.
MAX_LABELLED_REGISTRIES = 256
OTHER_LABEL = "other"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the registry name and its upstream client."""

    registry: str
    client: UpstreamClient
    explicit_ns: bool


class UpstreamRouter:
    def __init__(
        self,
        *,
        config: Config,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        transport_marks: Path | None = None,
    ) -> None:
        self._config = config
        self._session = session
        self._metrics = metrics
        self._credentials: dict[str, Credentials] = {}
        if config.docker_config is not None:
            self._credentials = _node_credentials(config.docker_config)
        self._clients: dict[str, UpstreamClient] = {}
        # Registries reached with no configured upstream, least recently routed first:
        # a pod can name any number of them, so the oldest client goes (a request in
        # flight keeps its own); refusing new ones instead would lock the node out of
        # every registry it had not pulled from yet.
        self._unlisted: OrderedDict[str, None] = OrderedDict()
        self._labelled: set[str] = set()
        # Built up front, so every transport's health shows in /metrics from the start.
        # With several workers, a transport marked bad by one is bypassed by all
        # (``transport_marks``: a directory in the supervisor's runtime dir).
        marks = SharedMarks(transport_marks) if transport_marks is not None else None
        self.transports: dict[str, TransportChain] = {
            name: TransportChain(
                registry=name,
                transports=upstream.transports,
                session=session,
                metrics=metrics,
                marks=marks,
            )
            for name, upstream in config.upstreams.items()
            if upstream.transports
        }

    def route(self, ns: str | None) -> Route:
        if ns is None or ns == "":
            if self._config.default_upstream is None:
                raise RegistryUnknown(
                    "request has no ns= parameter and no default upstream is configured"
                )
            return Route(
                self._config.default_upstream, self._client(self._config.default_upstream), False
            )
        registry = without_https_port(validate_registry(ns))
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
        return Route(registry, self._client(registry), True)

    def _client(self, registry: str) -> UpstreamClient:
        client = self._clients.get(registry)
        if client is not None:
            if registry in self._unlisted:
                self._unlisted.move_to_end(registry)
            return client
        upstream = self._config.upstreams.get(registry)
        if upstream is None:
            if self._config.unlisted_registries != "https":
                raise RegistryUnknown(
                    f"registry {registry!r} has no configured upstream and "
                    "unlistedRegistries is 'deny'"
                )
            while len(self._unlisted) >= MAX_UNLISTED_CLIENTS:
                oldest, _ = self._unlisted.popitem(last=False)
                self._clients.pop(oldest, None)
            self._unlisted[registry] = None
            if len(self._labelled) < MAX_LABELLED_REGISTRIES:
                self._labelled.add(registry)
            upstream = UpstreamConfig(name=registry, url=f"https://{registry}")
        client = UpstreamClient(
            config=upstream,
            session=self._session,
            # Node credentials are keyed by the registry name as images spell it; a
            # key for the upstream's own host:port (a mirror's address) also counts.
            credentials=self._credentials.get(registry)
            or self._credentials.get(urlsplit(upstream.url).netloc),
            timeouts=self._config.timeouts,
            retries=self._config.retries,
            metrics=self._metrics,
            transports=self.transports.get(registry),
            metrics_label=(
                registry
                if registry in self._config.upstreams or registry in self._labelled
                else OTHER_LABEL
            ),
        )
        self._clients[registry] = client
        return client


def _node_credentials(path: Path) -> dict[str, Credentials]:
    """The node's credentials, or none (with the reason logged) when the file is missing,
    empty or unreadable: a node without a kubelet ``config.json`` still mirrors public
    content, where refusing to start would leave containerd with no mirror at all."""
    try:
        credentials = load_docker_config(path)
    except FileNotFoundError:
        log.warning("docker config %s does not exist: no node credentials", path)
        return {}
    except (OSError, ValueError) as exc:
        log.error("docker config %s is unreadable (%s): no node credentials", path, exc)
        return {}
    log.info("node credentials loaded for %d registries from %s", len(credentials), path)
    return credentials
