"""Command line: reads and validates the config, then hands it to the wiring
(``proxy.node``) or, with several workers, to the supervisor (``proxy.node.supervisor``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from proxy import __version__, node
from proxy.cli import hosts as hosts_cli
from proxy.cli import logs
from proxy.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    load_config_file,
    parse_listen,
    parse_size,
    parse_upstream_flag,
    parse_workers,
    validate,
    worker_count,
)
from proxy.node import CriEndpoints
from proxy.node.supervisor import Supervisor

log = logging.getLogger("pullgate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pullgate", description="Verifying pull-through OCI registry mirror"
    )
    parser.add_argument("--version", action="version", version=f"pullgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    add_common(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT|off",
        help="admin listener for prefetch and metrics (default 127.0.0.1:5051)",
    )
    serve.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="verified blob cache directory (a hostPath on NVMe)",
    )
    serve.add_argument("--cache-max-bytes", metavar="SIZE", help="cache budget, e.g. 500G")
    serve.add_argument(
        "--direct-min-bytes",
        metavar="SIZE",
        help="blobs this big bypass the page cache (O_DIRECT; default 64M, 0 = never)",
    )
    serve.add_argument(
        "--cri-listen",
        metavar="ENDPOINT",
        help="serve the CRI ImageService here (e.g. unix:///run/pullgate/cri.sock)",
    )
    serve.add_argument(
        "--cri-runtime-endpoint",
        default="unix:///run/containerd/containerd.sock",
        metavar="ENDPOINT",
        help="containerd's CRI socket that the ImageService forwards to",
    )
    serve.add_argument(
        "--workers",
        metavar="N|auto",
        help="serving processes sharing the port (default auto: one per core, at most 8)",
    )
    serve.add_argument(
        "--runtime-dir",
        type=Path,
        metavar="DIR",
        help="where the worker supervisor keeps its private state (default: temp dir)",
    )
    serve.add_argument(
        "--complete-on-disconnect",
        action="store_true",
        default=None,
        help="finish cache fills even when every client went away",
    )
    warm = sub.add_parser("prefetch", help="warm a running pullgate's cache for references")
    warm.add_argument("references", nargs="+", metavar="REF", help="registry/repo:tag or @digest")
    warm.add_argument(
        "--admin",
        default="http://127.0.0.1:5051",
        metavar="URL",
        help="the node pullgate's admin endpoint (default http://127.0.0.1:5051)",
    )
    warm.add_argument("--timeout", type=float, default=3600.0, help="give up after SECONDS")
    verify = sub.add_parser(
        "verify", help="explain the policy's verdict for one reference (exit 1 if refused)"
    )
    add_common(verify)
    verify.add_argument("reference", metavar="REF", help="registry/repo:tag or @digest")
    hosts_cli.add_parser(sub)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="route ns=NAME to URL (repeatable); replaces the config's upstreams",
    )
    parser.add_argument(
        "--default-upstream",
        metavar="NAME",
        help="upstream for requests without ns= (default: the only --upstream)",
    )
    parser.add_argument(
        "--docker-config",
        type=Path,
        metavar="FILE",
        help="docker config.json with node credentials for upstreams",
    )
    parser.add_argument("--policy", type=Path, metavar="FILE", help="signature policy (YAML)")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default=None,
        choices=logs.FORMATS,
        help="text lines (default) or one JSON object per line",
    )


def resolve_config(args: argparse.Namespace) -> Config:
    config = load_config_file(args.config) if args.config else DEFAULT_CONFIG
    if getattr(args, "listen", None):
        host, port = parse_listen(args.listen)
        config = replace(config, listen_host=host, listen_port=port)
    if args.upstream:
        upstreams = {u.name: u for u in map(parse_upstream_flag, args.upstream)}
        default = next(iter(upstreams)) if len(upstreams) == 1 else None
        config = replace(config, upstreams=upstreams, default_upstream=default)
    if args.default_upstream:
        config = replace(config, default_upstream=args.default_upstream)
    if args.docker_config:
        config = replace(config, docker_config=args.docker_config)
    if args.policy:
        config = replace(config, policy=args.policy)
    admin = getattr(args, "admin_listen", None)
    if admin:
        config = replace(config, admin_listen=None if admin == "off" else parse_listen(admin))
    cache = config.cache
    if getattr(args, "cache_dir", None):
        cache = replace(cache, dir=args.cache_dir)
    if getattr(args, "cache_max_bytes", None):
        cache = replace(cache, max_bytes=parse_size(args.cache_max_bytes))
    if getattr(args, "direct_min_bytes", None) is not None:
        text = args.direct_min_bytes.strip()
        cache = replace(cache, direct_min_bytes=0 if text == "0" else parse_size(text))
    if getattr(args, "complete_on_disconnect", None):
        cache = replace(cache, complete_on_disconnect=True)
    config = replace(config, cache=cache)
    workers = getattr(args, "workers", None)
    if workers is not None:
        config = replace(config, workers=parse_workers(workers, where="--workers"))
    if getattr(args, "runtime_dir", None):
        config = replace(config, runtime_dir=args.runtime_dir)
    if args.log_level:
        config = replace(config, log_level=args.log_level)
    if getattr(args, "log_format", None):
        config = replace(config, log_format=args.log_format)
    return validate(config)


def serve(config: Config, *, cri: CriEndpoints | None = None) -> int:
    """One process for ``--workers 1``; else a supervisor over N worker processes."""
    workers = worker_count(config)
    if workers == 1:
        return node.serve(config, cri=cri)
    return Supervisor(config, workers=workers, cri=cri).run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prefetch":
        from proxy.cli.prefetch import run_prefetch

        return run_prefetch(args.admin, args.references, timeout=args.timeout)
    if args.command == "install-hosts":
        return hosts_cli.run(args)
    if args.command == "doctor":
        return hosts_cli.run_doctor(args)
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"pullgate: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    if args.command == "serve":
        cri = CriEndpoints(args.cri_listen, args.cri_runtime_endpoint) if args.cri_listen else None
        return serve(config, cri=cri)
    if args.command == "verify":
        from proxy.cli.verify import verify_reference

        return asyncio.run(verify_reference(config, args.reference))
    parser.error(f"unknown command {args.command}")
    return 2
