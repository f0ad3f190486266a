"""Command line: wires config, pipeline and front ends together."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from proxy import __version__, hosts_cli
from proxy.cache import BlobStore, NoStore
from proxy.cache.disk import CacheLimits, DiskBlobStore
from proxy.cache.verified import NoVerifiedManifests, VerifiedManifestStore
from proxy.cache.verified_disk import DiskVerifiedManifests
from proxy.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    load_config_file,
    parse_listen,
    parse_size,
    parse_upstream_flag,
    validate,
)
from proxy.gate import AllowAllGate, Gate
from proxy.http.admin import build_admin_app
from proxy.http.app import PIPELINE_KEY, ROUTER_KEY, build_app
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.verify.base import PolicyError
from proxy.verify.gate import SignatureGate
from proxy.verify.policy import load_policy
from proxy.verify.reload import PolicyWatcher, policy_watch_ctx

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
    if getattr(args, "complete_on_disconnect", None):
        cache = replace(cache, complete_on_disconnect=True)
    config = replace(config, cache=cache)
    if args.log_level:
        config = replace(config, log_level=args.log_level)
    return validate(config)


def build_gate(config: Config, metrics: Metrics) -> Gate:
    """The signature gate for ``config.policy``; allow-all, loudly, without one."""
    if config.policy is None:
        log.warning(
            "no --policy given: serving everything UNVERIFIED (allow-all). "
            "Give a policy to verify signatures."
        )
        return AllowAllGate()
    return SignatureGate(load_policy(config.policy), metrics=metrics)


def build_stores(config: Config) -> tuple[BlobStore, VerifiedManifestStore]:
    """The blob store and the verified-manifest store, both under ``--cache-dir``
    (nothing kept without one)."""
    cache = config.cache
    if cache.dir is None:
        return NoStore(), NoVerifiedManifests()
    store = DiskBlobStore(
        root=cache.dir,
        limits=CacheLimits(
            max_bytes=cache.max_bytes,
            high_watermark=cache.high_watermark,
            low_watermark=cache.low_watermark,
            min_free_bytes=cache.min_free_bytes,
        ),
    )
    store.recover()
    manifests = DiskVerifiedManifests(root=cache.dir)
    manifests.recover()
    return store, manifests


def serve(config: Config, *, cri: tuple[str, str] | None = None) -> int:
    metrics = Metrics()
    try:
        gate = build_gate(config, metrics)
    except PolicyError as exc:
        print(f"pullgate: policy error: {exc}", file=sys.stderr)
        return 2
    store, manifests = build_stores(config)
    pipeline = Pipeline(
        gate=gate,
        store=store,
        manifests=manifests,
        metrics=metrics,
        complete_on_disconnect=config.cache.complete_on_disconnect,
        tag_staleness=config.cache.tag_staleness,
    )
    app = build_app(config=config, pipeline=pipeline, metrics=metrics)
    if isinstance(gate, SignatureGate) and config.policy is not None:
        # Hot reload runs for the app's lifetime (started and stopped with it).
        watcher = PolicyWatcher(path=config.policy, gate=gate, metrics=metrics)
        app.cleanup_ctx.append(policy_watch_ctx(watcher))
    log.info(
        "pullgate %s listening on %s:%d; upstreams: %s; default: %s",
        __version__,
        config.listen_host,
        config.listen_port,
        ", ".join(f"{u.name}={u.url}" for u in config.upstreams.values()) or "none",
        config.default_upstream,
    )
    import uvloop

    uvloop.run(_serve_forever(app, config, cri=cri))
    return 0


async def _serve_forever(
    app: web.Application,
    config: Config,
    *,
    cri: tuple[str, str] | None,
) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    cri_server = None
    try:
        if cri is not None:
            from proxy.cri.server import start_cri_server

            cri_server, _ = await start_cri_server(
                listen=cri[0],
                runtime_endpoint=cri[1],
                pipeline=app[PIPELINE_KEY],
                router=lambda: app[ROUTER_KEY],
            )
        site = web.TCPSite(runner, config.listen_host, config.listen_port, backlog=1024)
        await site.start()
        if config.admin_listen is not None:
            admin_runner = web.AppRunner(build_admin_app(app), access_log=None)
            await admin_runner.setup()
            host, port = config.admin_listen
            await web.TCPSite(admin_runner, host, port).start()
            log.info("admin endpoints (prefetch, metrics) on http://%s:%d", host, port)
        print(f"pullgate: serving on http://{config.listen_host}:{config.listen_port}", flush=True)
        await asyncio.Event().wait()
    finally:
        if cri_server is not None:
            await cri_server.stop(grace=2)
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prefetch":
        from proxy.prefetch_cli import run_prefetch

        return run_prefetch(args.admin, args.references, timeout=args.timeout)
    if args.command == "install-hosts":
        return hosts_cli.run(args)
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"pullgate: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        cri = (args.cri_listen, args.cri_runtime_endpoint) if args.cri_listen else None
        try:
            return serve(config, cri=cri)
        except KeyboardInterrupt:
            return 0
    if args.command == "verify":
        from proxy.verify_cli import verify_reference

        return asyncio.run(verify_reference(config, args.reference))
    parser.error(f"unknown command {args.command}")
    return 2
