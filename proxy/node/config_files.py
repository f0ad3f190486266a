"""The files the config names that workers read when they start: CA files and the
node's docker config, kept by the supervisor for workers that start later.

The config is read and validated once, at start, and passed down to the workers. The
CA files it names (``upstreams.<name>.caFile`` and each transport's ``caFile``) are
opened by each worker when it builds its upstream clients, though, so a worker started
later (after a crash) would read whatever the file holds then: a file broken since
would stop that worker from serving, again and again. So the supervisor copies each
CA file once at start into its runtime directory (``ca/<sha256>.pem``), checks that it
loads as a CA bundle, and gives the workers a config naming the copies: every worker,
first or restarted, trusts what the node started with (a changed CA file takes a
restart, as a changed config does).

The docker config (node credentials) is different: it may be rotated in place, and a
worker that starts reads the file as it is then. But one broken since (a half-written
file, a Secret removed) would leave a restarted worker with no credentials, while its
siblings have them. So the supervisor keeps a copy of it as it loaded at start
(``docker-config.json``), and a worker whose file does not load uses that copy, saying
so at ERROR.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from dataclasses import replace
from pathlib import Path

from proxy.config import Config, ConfigError
from proxy.upstream.auth import load_docker_config

log = logging.getLogger("pullgate")

CA_DIR = "ca"
DOCKER_CONFIG_COPY = "docker-config.json"


class _Pinner:
    def __init__(self, runtime: Path) -> None:
        self._directory = runtime / CA_DIR
        self._copies: dict[Path, Path] = {}

    def pin(self, path: Path | None, where: str) -> Path | None:
        if path is None:
            return None
        if path in self._copies:
            return self._copies[path]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: caFile {path}: {exc.strerror or exc}") from exc
        self._directory.mkdir(mode=0o700, exist_ok=True)
        copy = self._directory / f"{hashlib.sha256(data).hexdigest()}.pem"
        copy.write_bytes(data)
        try:
            ssl.create_default_context(cafile=str(copy))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"{where}: caFile {path} does not load as CA certificates: {exc}"
            ) from exc
        self._copies[path] = copy
        return copy


def pin_ca_files(config: Config, runtime: Path) -> Config:
    """``config`` with every caFile replaced by a checked copy under ``runtime``.

    ConfigError if one cannot be read or does not load as CA certificates.
    """
    pinner = _Pinner(runtime)
    upstreams = {}
    for name, upstream in config.upstreams.items():
        where = f"upstream {name}"
        transports = tuple(
            replace(
                transport,
                ca_file=pinner.pin(transport.ca_file, f"{where}: transport {transport.name}"),
            )
            for transport in upstream.transports
        )
        upstreams[name] = replace(
            upstream, ca_file=pinner.pin(upstream.ca_file, where), transports=transports
        )
    return replace(config, upstreams=upstreams)


def keep_docker_config(config: Config, runtime: Path) -> Path | None:
    """Copy the docker config to ``runtime`` if it loads now (the copy, else None)."""
    path = config.docker_config
    if path is None:
        return None
    try:
        data = path.read_bytes()
        load_docker_config(path)
    except (OSError, ValueError):
        return None  # each worker says why, as a single process does
    copy = runtime / DOCKER_CONFIG_COPY
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return copy


def docker_config_or_copy(config: Config, runtime: Path | None) -> Config:
    """``config``, or with the supervisor's copy of the docker config when the file
    does not load now (a worker started after it broke) and a copy was kept."""
    path = config.docker_config
    if path is None or runtime is None:
        return config
    copy = runtime / DOCKER_CONFIG_COPY
    try:
        load_docker_config(path)
        return config
    except (OSError, ValueError) as exc:
        if not copy.is_file():
            return config
        log.error(
            "docker config %s does not load (%s): using the copy taken when pullgate "
            "started (%s) until a restart",
            path,
            exc,
            copy,
        )
    return replace(config, docker_config=copy)
