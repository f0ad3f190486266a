"""The CA files the config names, read once by the supervisor for every worker.

The config is read and validated once, at start, and passed down to the workers. The
CA files it names (``upstreams.<name>.caFile`` and each transport's ``caFile``) are
opened by each worker when it builds its upstream clients, though, so a worker started
later (after a crash) would read whatever the file holds then: a file broken since
would stop that worker from serving, again and again. So the supervisor copies each
CA file once at start into its runtime directory (``ca/<sha256>.pem``), checks that it
loads as a CA bundle, and gives the workers a config naming the copies: every worker,
first or restarted, trusts what the node started with (a changed CA file takes a
restart, as a changed config does).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import replace
from pathlib import Path

from proxy.config import Config, ConfigError

CA_DIR = "ca"


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
