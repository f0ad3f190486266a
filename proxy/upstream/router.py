"""Routing ``ns=<registry>`` to the configured upstream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from proxy.config import Config, UpstreamConfig
from proxy.metrics import Metrics
from proxy.oci.errors import NameInvalid, RegistryUnknown
from proxy.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES, validate_registry
from proxy.upstream.auth import Credentials, load_docker_config
from proxy.upstream.client import UpstreamClient
from proxy.upstream.transports import SharedMarks, TransportChain

log = logging.getLogger("pullgate.router")


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
        registry = validate_registry(ns)
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
        return Route(registry, self._client(registry), True)

    def _client(self, registry: str) -> UpstreamClient:
        client = self._clients.get(registry)
        if client is not None:
            return client
        upstream = self._config.upstreams.get(registry)
        if upstream is None:
            if self._config.unlisted_registries != "https":
                raise RegistryUnknown(
                    f"registry {registry!r} has no configured upstream and "
                    "unlistedRegistries is 'deny'"
                )
            if len(self._clients) > 1024:
                raise NameInvalid("too many distinct registries")
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
