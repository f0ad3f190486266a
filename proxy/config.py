"""Configuration: read once, validated, and passed down explicitly.

A YAML file holds everything; the main settings also work as flags. With no file and
no flags, pullgate starts on ``DEFAULT_CONFIG`` (documented in the README).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.oci.errors import NameInvalid
from proxy.oci.reference import validate_registry, validate_repository


class ConfigError(Exception):
    """A configuration file or flag that cannot be used; the message says why."""


# The minimum transfer rate of a blob body (``minRate``, bytes per second of waiting
# for the upstream), judged over ``minRateWindow`` seconds of waiting: a healthy pull
# (a congested WAN link shared by a few layers still moves hundreds of KB/s) never
# comes near it; a drip of a few bytes just inside the read timeout fails it in
# one window. 0 disables it.
DEFAULT_MIN_RATE = 16 * 1024.0
DEFAULT_MIN_RATE_WINDOW = 30.0


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """One untrusted transport in front of an upstream (``upstreams.<name>.transports``):
    a Dragonfly dfdaemon proxy, a Spegel node mirror, a Harbor or zot proxy cache, a
    registry in proxy mode, or another pullgate. Blobs are asked of it first; whatever
    it serves is checked against the digest like the origin's bytes."""

    name: str
    url: str
    ca_file: Path | None = None
    # Seconds to open the connection; refused connections fail over at once.
    connect: float = 2.0
    # Seconds from the request to the response headers: a transport that accepts and
    # then says nothing costs a pull at most this long.
    first_byte: float = 5.0
    # Seconds without a byte mid-body before the body counts as broken.
    read: float = 30.0
    # Bytes per second below which a body counts as stalled (``minRate``; 0: off),
    # judged over ``minRateWindow`` seconds of waiting; it marks the transport bad.
    min_rate: float = DEFAULT_MIN_RATE
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW
    # Seconds a transport that served a wrong digest (or broke mid-body) is bypassed.
    bad_for: float = 300.0
    # Seconds a transport that failed to answer (refused, timed out, 5xx) is bypassed.
    down_for: float = 30.0
    # Repository path prefix at the transport, e.g. a Harbor proxy-cache project:
    # ``/v2/<prefix>/<repository>/blobs/<digest>``; "" for none.
    repository_prefix: str = ""
    # Seconds after which, if this transport has not answered, the next one (or the
    # origin) is asked too and the first usable answer wins; None: no hedging.
    hedge_after: float | None = None
    # Extra request headers, e.g. Dragonfly's ``X-Dragonfly-Registry: https://<origin>``;
    # never credentials (``FORBIDDEN_TRANSPORT_HEADERS``).
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    ca_file: Path | None = None
    # Token realm hosts (besides the upstream host) that may receive node credentials.
    token_realm_hosts: tuple[str, ...] = ()
    # Tried in order for blobs before the origin (``url``); see ``TransportConfig``.
    transports: tuple[TransportConfig, ...] = ()
    # The origin's own ``minRate``/``minRateWindow``; None: ``timeouts``'.
    min_rate: float | None = None
    min_rate_window: float | None = None


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    connect: float = 10.0
    read: float = 60.0
    # Every origin's minimum blob transfer rate, unless its upstream sets its own.
    min_rate: float = DEFAULT_MIN_RATE
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 10.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The node-local verified blob cache. No directory means no cache."""

    dir: Path | None = None
    max_bytes: int = 100 * 1024**3
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    min_free_bytes: int = 1024**3
    complete_on_disconnect: bool = False
    # Blobs of this size and more are written and read around the page cache
    # (O_DIRECT, cache.directMinBytes); 0 = never.
    direct_min_bytes: int = 64 * 1024**2
    # Background re-hash of stored blobs, in bytes per second; 0 disables it.
    scrub_bytes_per_second: int = 64 * 1024**2
    scrub_interval_seconds: float = 3600.0
    # Seconds a tag may resolve to its last verified digest while the upstream is
    # unreachable (cache.tagStaleness); 0 = off: such pulls get 503 with the reason.
    tag_staleness: float = 0.0


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5050
    # The admin listener (prefetch, metrics); None disables it.
    admin_listen: tuple[str, int] | None = ("127.0.0.1", 5051)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    default_upstream: str | None = None
    # What to do with ns= registries that have no upstream entry:
    # "https" routes them to https://<ns>, "deny" refuses them with NAME_UNKNOWN.
    unlisted_registries: str = "https"
    docker_config: Path | None = None
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    policy: Path | None = None
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (proxy.cli.logs)
    cache: CacheConfig = field(default_factory=lambda: CacheConfig())
    # Serving processes (``workers``); None: one per usable core, at most
    # ``AUTO_WORKERS_MAX``. With more than one, a small supervisor runs them.
    workers: int | None = None
    # Where the supervisor makes its private runtime directory (shared allowances,
    # per-worker metrics files); None: the system temp dir. Best on a tmpfs.
    runtime_dir: Path | None = None


AUTO_WORKERS_MAX = 8
MAX_WORKERS = 64


DEFAULT_CONFIG = Config(
    upstreams={"docker.io": UpstreamConfig(name="docker.io", url="https://registry-1.docker.io")},
    default_upstream="docker.io",
)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {text!r} must be HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_upstream_flag(text: str) -> UpstreamConfig:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise ConfigError(f"--upstream {text!r} must be NAME=URL")
    return make_upstream(name, {"url": url}, where=f"--upstream {text}")


def make_upstream(name: str, raw: Any, *, where: str) -> UpstreamConfig:
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'url'")
    try:
        registry = validate_registry(name)
    except Exception as exc:
        raise ConfigError(f"{where}: invalid registry name {name!r}") from exc
    url = raw.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: 'url' is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: url {url!r} must be http:// or https:// with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: url {url!r} must not carry a path or query")
    ca_file = raw.get("caFile") or raw.get("ca_file")
    realms = raw.get("tokenRealmHosts") or raw.get("token_realm_hosts") or []
    if not isinstance(realms, list) or not all(isinstance(h, str) for h in realms):
        raise ConfigError(f"{where}: tokenRealmHosts must be a list of host names")
    known = {
        "url",
        "caFile",
        "ca_file",
        "tokenRealmHosts",
        "token_realm_hosts",
        "transports",
        "minRate",
        "minRateWindow",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return UpstreamConfig(
        name=registry,
        url=url.rstrip("/"),
        ca_file=Path(ca_file) if ca_file else None,
        token_realm_hosts=tuple(realms),
        transports=make_transports(raw.get("transports"), origin=url, where=where),
        **_min_rate_fields(raw, where),
    )


def parse_rate(raw: object, *, where: str) -> float:
    """``minRate``: bytes per second, a number or a size (``16K``, ``1M``); 0 disables."""
    if isinstance(raw, bool):
        raise ConfigError(f"{where} must be a number of bytes per second (or 0: off)")
    if isinstance(raw, str):
        if raw.strip() in ("0", "0.0"):
            return 0.0
        try:
            return float(parse_size(raw))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(raw, (int, float)) or not 0 <= raw < float("inf"):
        raise ConfigError(f"{where} must be a number of bytes per second (or 0: off)")
    return float(raw)


def parse_rate_window(raw: object, *, where: str) -> float:
    """``minRateWindow``: seconds, more than 0 and at most a day."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 < raw <= 86400:
        raise ConfigError(f"{where} must be more than 0 and at most 86400 seconds")
    return float(raw)


def _min_rate_fields(raw: dict[str, Any], where: str) -> dict[str, float]:
    """The ``minRate``/``minRateWindow`` keys of an upstream or transport entry."""
    fields: dict[str, float] = {}
    if "minRate" in raw:
        fields["min_rate"] = parse_rate(raw["minRate"], where=f"{where}: minRate")
    if "minRateWindow" in raw:
        fields["min_rate_window"] = parse_rate_window(
            raw["minRateWindow"], where=f"{where}: minRateWindow"
        )
    return fields


TRANSPORT_TIMEOUT_KEYS = {"connect": "connect", "firstByte": "first_byte", "read": "read"}
# A transport is untrusted: nothing that authenticates goes to it, and nothing that
# changes what the request means.
FORBIDDEN_TRANSPORT_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "host", "range", "content-length",
     "transfer-encoding", "connection", "accept-encoding"}
)  # fmt: skip


def _transport_headers(raw: Any, at: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: headers must map header names to values")
    headers: list[tuple[str, str]] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"{at}: header names and values must be strings")
        if not name or any(c in name for c in " :\r\n") or any(c in value for c in "\r\n"):
            raise ConfigError(f"{at}: header {name!r} is not a valid header line")
        if name.lower() in FORBIDDEN_TRANSPORT_HEADERS:
            raise ConfigError(
                f"{at}: header {name!r} may not be sent to a transport (it is untrusted)"
            )
        headers.append((name, value))
    return tuple(headers)


def make_transports(raw: Any, *, origin: str, where: str) -> tuple[TransportConfig, ...]:
    """The ``transports:`` list of one upstream: each entry a URL or a mapping with
    ``url`` and optionally ``name``, ``caFile``, ``timeouts: {connect, firstByte,
    read}``, ``badFor`` and ``downFor`` (seconds)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: transports must be a list")
    transports: list[TransportConfig] = []
    for index, entry in enumerate(raw):
        at = f"{where}.transports[{index}]"
        if isinstance(entry, str):
            entry = {"url": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a URL or a mapping with 'url'")
        known = {
            "name",
            "url",
            "caFile",
            "timeouts",
            "badFor",
            "downFor",
            "headers",
            "hedgeAfter",
            "repositoryPrefix",
            "minRate",
            "minRateWindow",
        }
        prefix = entry.get("repositoryPrefix", "")
        if not isinstance(prefix, str):
            raise ConfigError(f"{at}: repositoryPrefix must be a repository path")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_repository(prefix)
            except NameInvalid as exc:
                raise ConfigError(
                    f"{at}: repositoryPrefix {prefix!r} is not a repository path"
                ) from exc
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"{at}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        url = entry.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{at}: 'url' is required")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{at}: url {url!r} must be http:// or https:// with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(f"{at}: url {url!r} must not carry a path, query or user")
        url = url.rstrip("/")
        if url == origin.rstrip("/"):
            raise ConfigError(f"{at}: url {url!r} is the origin itself")
        name = entry.get("name", parts.netloc)
        if not isinstance(name, str) or not name or name == "origin" or len(name) > 64:
            raise ConfigError(f"{at}: name must be a short string other than 'origin'")
        values: dict[str, float] = {}
        timeouts = entry.get("timeouts") or {}
        if not isinstance(timeouts, dict):
            raise ConfigError(f"{at}: timeouts must be a mapping of connect, firstByte, read")
        bad_timeouts = set(timeouts) - set(TRANSPORT_TIMEOUT_KEYS)
        if bad_timeouts:
            raise ConfigError(
                f"{at}: unknown timeouts {sorted(bad_timeouts)}; known: connect, firstByte, read"
            )
        pairs = [(TRANSPORT_TIMEOUT_KEYS[k], v, f"timeouts.{k}") for k, v in timeouts.items()]
        pairs += [(f, entry[k], k) for k, f in (("badFor", "bad_for"), ("downFor", "down_for"),
                  ("hedgeAfter", "hedge_after")) if k in entry]  # fmt: skip
        for field_name, value, key in pairs:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{at}: {key} must be a number of seconds")
            if not 0 < float(value) <= 86400:
                raise ConfigError(f"{at}: {key} must be more than 0 and at most 86400 seconds")
            values[field_name] = float(value)
        ca_file = entry.get("caFile")
        transports.append(
            TransportConfig(
                name=name,
                url=url,
                ca_file=Path(ca_file) if ca_file else None,
                headers=_transport_headers(entry.get("headers"), at),
                repository_prefix=prefix,
                **values,
                **_min_rate_fields(entry, at),
            )
        )
    names = [t.name for t in transports]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: transport names must be unique, got {names}")
    urls = [t.url for t in transports]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where}: a transport URL is listed twice")
    return tuple(transports)


def load_config_file(path: Path, base: Config = DEFAULT_CONFIG) -> Config:
    """Read a YAML config file on top of ``base``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if doc is None:
        return base
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    known = {
        "listen",
        "upstreams",
        "defaultUpstream",
        "unlistedRegistries",
        "dockerConfig",
        "timeouts",
        "retries",
        "policy",
        "logLevel",
        "logFormat",
        "cache",
        "adminListen",
        "workers",
        "runtimeDir",
    }
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    config = base
    relative = path.parent
    if "listen" in doc:
        host, port = parse_listen(str(doc["listen"]))
        config = replace(config, listen_host=host, listen_port=port)
    if "adminListen" in doc:
        raw_admin = doc["adminListen"]
        admin = None if raw_admin in (None, "", "off") else parse_listen(str(raw_admin))
        config = replace(config, admin_listen=admin)
    if "upstreams" in doc:
        raw = doc["upstreams"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: upstreams must map registry names to upstreams")
        upstreams = {
            u.name: u
            for u in (
                make_upstream(str(name), value, where=f"{path}: upstreams.{name}")
                for name, value in raw.items()
            )
        }
        upstreams = {
            name: replace(
                u,
                ca_file=relative / u.ca_file if u.ca_file else None,
                transports=tuple(
                    replace(t, ca_file=relative / t.ca_file) if t.ca_file else t
                    for t in u.transports
                ),
            )
            for name, u in upstreams.items()
        }
        config = replace(config, upstreams=upstreams)
    if "defaultUpstream" in doc:
        config = replace(config, default_upstream=str(doc["defaultUpstream"]) or None)
    if "unlistedRegistries" in doc:
        config = replace(config, unlisted_registries=str(doc["unlistedRegistries"]))
    if "dockerConfig" in doc:
        config = replace(config, docker_config=relative / str(doc["dockerConfig"]))
    if "policy" in doc:
        config = replace(config, policy=relative / str(doc["policy"]))
    if "logLevel" in doc:
        config = replace(config, log_level=str(doc["logLevel"]))
    if "logFormat" in doc:
        if doc["logFormat"] not in ("text", "json"):
            raise ConfigError(f"{path}: logFormat must be text or json")
        config = replace(config, log_format=str(doc["logFormat"]))
    if "timeouts" in doc:
        raw_timeouts = doc["timeouts"]
        if isinstance(raw_timeouts, dict):
            raw_timeouts = dict(raw_timeouts)
            if "minRate" in raw_timeouts:
                at = f"{path}: timeouts.minRate"
                raw_timeouts["minRate"] = parse_rate(raw_timeouts["minRate"], where=at)
            if "minRateWindow" in raw_timeouts:
                at = f"{path}: timeouts.minRateWindow"
                raw_timeouts["minRateWindow"] = parse_rate_window(
                    raw_timeouts["minRateWindow"], where=at
                )
        config = replace(config, timeouts=_dataclass_from(TimeoutConfig, raw_timeouts, path))
    if "cache" in doc:
        raw_cache = doc["cache"]
        if not isinstance(raw_cache, dict):
            raise ConfigError(f"{path}: cache must be a mapping")
        raw_cache = {_snake(k): v for k, v in raw_cache.items()}
        cache_dir = raw_cache.pop("dir", None)
        for size_key in (
            "max_bytes",
            "min_free_bytes",
            "scrub_bytes_per_second",
            "direct_min_bytes",
        ):
            if isinstance(raw_cache.get(size_key), str):
                raw_cache[size_key] = parse_size(raw_cache[size_key])
        cache = _dataclass_from(CacheConfig, raw_cache, path)
        if cache_dir:
            cache = replace(cache, dir=relative / str(cache_dir))
        config = replace(config, cache=cache)
    if "retries" in doc:
        config = replace(config, retries=_dataclass_from(RetryConfig, doc["retries"], path))
    if "workers" in doc:
        config = replace(config, workers=parse_workers(doc["workers"], where=f"{path}: workers"))
    if "runtimeDir" in doc:
        raw_runtime = doc["runtimeDir"]
        config = replace(config, runtime_dir=relative / str(raw_runtime) if raw_runtime else None)
    return validate(config)


def parse_workers(raw: object, *, where: str = "workers") -> int | None:
    """``auto`` (or nothing) -> None; otherwise a whole number of serving processes."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "auto")):
        return None
    if isinstance(raw, bool):
        raise ConfigError(f"{where} must be a number of processes or 'auto'")
    try:
        workers = int(str(raw).strip())
    except ValueError as exc:
        raise ConfigError(f"{where} must be a number of processes or 'auto'") from exc
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{where} must be between 1 and {MAX_WORKERS}")
    return workers


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, lowered by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def worker_count(config: Config) -> int:
    """The serving processes to run: ``workers``, else one per usable core (at most 8)."""
    if config.workers is not None:
        return config.workers
    return min(usable_cores(), AUTO_WORKERS_MAX)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def parse_size(text: str) -> int:
    """``100G``, ``512M``, ``4096`` -> bytes (binary units)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = int(float(number) * factor)
    except (ValueError, OverflowError) as exc:  # OverflowError: inf, 1e400
        raise ConfigError(f"size {text!r} is not a number with an optional K/M/G/T unit") from exc
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value


def _dataclass_from(cls: Any, raw: Any, path: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {cls.__name__} must be a mapping")
    raw = {_snake(str(k)): v for k, v in raw.items()}
    try:
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in raw.items()})
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: bad {cls.__name__}: {exc}") from exc


def validate(config: Config) -> Config:
    if config.unlisted_registries not in ("https", "deny"):
        raise ConfigError("unlistedRegistries must be 'https' or 'deny'")
    if config.default_upstream and config.default_upstream not in config.upstreams:
        raise ConfigError(
            f"defaultUpstream {config.default_upstream!r} is not among the upstreams "
            f"{sorted(config.upstreams)}"
        )
    if config.retries.attempts < 1 or config.retries.attempts > 10:
        raise ConfigError("retries.attempts must be between 1 and 10")
    cache = config.cache
    if not 0 < cache.low_watermark <= cache.high_watermark <= 1:
        raise ConfigError("cache watermarks must satisfy 0 < low <= high <= 1")
    if cache.max_bytes <= 0:
        raise ConfigError("cache.maxBytes must be positive")
    if cache.tag_staleness < 0:
        raise ConfigError("cache.tagStaleness must be 0 (off) or a number of seconds")
    if config.timeouts.connect <= 0 or config.timeouts.read <= 0:
        raise ConfigError("timeouts must be positive")
    if config.workers is not None and not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}")
    for upstream in config.upstreams.values():
        if upstream.ca_file is not None and not upstream.ca_file.is_file():
            raise ConfigError(f"upstream {upstream.name}: caFile {upstream.ca_file} not found")
        for transport in upstream.transports:
            if transport.ca_file is not None and not transport.ca_file.is_file():
                raise ConfigError(
                    f"upstream {upstream.name}: transport {transport.name}: "
                    f"caFile {transport.ca_file} not found"
                )
    return config
