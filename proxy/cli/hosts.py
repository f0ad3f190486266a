"""``pullgate install-hosts`` and ``pullgate doctor``: point containerd at pullgate with
no fallback, undo that, and find every hosts.toml that lets containerd bypass it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from proxy.cli import hoststoml
from proxy.cli.status import transport_report
from proxy.config import Config, ConfigError, load_config_file, worker_count
from proxy.node import supervisor
from proxy.verify.base import PolicyError
from proxy.verify.policy import load_policy

DEFAULT_SERVER = "http://127.0.0.1:5050"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hosts = sub.add_parser(
        "install-hosts",
        help="write containerd certs.d/<registry>/hosts.toml files routing pulls to pullgate",
    )
    hosts.add_argument("--certs-dir", type=Path, required=True, metavar="DIR")
    hosts.add_argument("--server", default=DEFAULT_SERVER, metavar="URL")
    hosts.add_argument(
        "--registry",
        action="append",
        metavar="NAME",
        help="registry name as containerd sees it (repeatable; _default is always written)",
    )
    hosts.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="pullgate's YAML config: write a hosts.toml for each of its upstreams too",
    )
    hosts.add_argument(
        "--restore",
        action="store_true",
        help="put back the files install-hosts backed up and remove the ones it added",
    )
    doctor = sub.add_parser(
        "doctor",
        help="report hosts.toml files that let containerd bypass pullgate (exit 1 if any)",
    )
    doctor.add_argument(
        "--certs-dir", type=Path, metavar="DIR", help="containerd's certs.d to check"
    )
    doctor.add_argument(
        "--server", default=DEFAULT_SERVER, metavar="URL", help="pullgate's address"
    )
    doctor.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="pullgate's YAML config: check its upstreams, policy and trust files too",
    )
    doctor.add_argument(
        "--admin",
        metavar="URL",
        help="a running pullgate's admin endpoint: show its transports (bytes, failovers,"
        " marked bad) from /metrics; a bypassed transport is a finding",
    )


def run(args: argparse.Namespace) -> int:
    """``install-hosts``: exit 0 when every file is in place, 2 when it could not be."""
    try:
        if args.restore:
            for line in hoststoml.restore(args.certs_dir):
                print(line)
            return 0
        registries = [hoststoml.DEFAULT_REGISTRY, *(args.registry or [])]
        if args.config is not None:
            registries += list(load_config_file(args.config).upstreams)
        for registry in dict.fromkeys(registries):
            for line in hoststoml.install(args.certs_dir, registry, args.server):
                print(line)
    except (hoststoml.HostsTomlError, ConfigError, OSError) as exc:
        print(f"pullgate install-hosts: {exc}", file=sys.stderr)
        return 2
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    """``doctor``: exit 0 when clean, 1 with one line per finding, 2 on bad arguments."""
    try:
        hoststoml.render(args.server)
    except hoststoml.HostsTomlError as exc:
        print(f"pullgate doctor: {exc}", file=sys.stderr)
        return 2
    if args.certs_dir is None and args.admin is None:
        # A usage error, as argparse reports one.
        print("pullgate doctor: error: give --certs-dir, --admin or both", file=sys.stderr)
        raise SystemExit(2)
    findings: list[tuple[Path, str]] = []
    registries: list[str] = []
    if args.config is not None:
        try:
            config = load_config_file(args.config)
        except ConfigError as exc:
            findings.append((args.config, f"config does not load: {exc}"))
        else:
            registries = list(config.upstreams)
            findings += check_config(args.config, config)
            for note in advice(config):
                print(f"note: {note}")
    if args.certs_dir is not None:
        findings += hoststoml.diagnose(args.certs_dir, args.server, registries)
    if args.admin is not None:
        lines, transport_findings = transport_report(args.admin)
        for line in lines:
            print(line)
        findings += [(Path(args.admin), finding) for finding in transport_findings]
    for path, reason in findings:
        print(f"{path}: {reason}")
    if findings:
        print(f"pullgate doctor: {len(findings)} problem(s)", file=sys.stderr)
        return 1
    if args.certs_dir is not None:
        print(f"pullgate doctor: {args.certs_dir} routes every pull to {args.server}, no fallback")
    return 0


def check_config(path: Path, config: Config) -> list[tuple[Path, str]]:
    """Upstream URLs that do not parse, and trust or credential files that cannot be read."""
    findings: list[tuple[Path, str]] = []
    for upstream in config.upstreams.values():
        try:
            parts = urlsplit(upstream.url)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("needs http:// or https:// and a host")
        except ValueError as exc:
            findings.append((path, f"upstream {upstream.name}: url {upstream.url!r}: {exc}"))
        if upstream.ca_file is not None:
            findings += _unreadable(upstream.ca_file, f"upstream {upstream.name} caFile")
    if config.docker_config is not None:
        findings += _unreadable(config.docker_config, "dockerConfig")
    if config.policy is None:
        findings.append((path, "no policy: pullgate lets every image through unverified"))
    else:
        try:
            load_policy(config.policy)
        except (PolicyError, OSError) as exc:
            findings.append((config.policy, f"policy does not load: {exc}"))
    return findings


def advice(config: Config) -> list[str]:
    """What works but costs something: printed as notes, not counted as problems."""
    if worker_count(config) > 1 and (problem := supervisor.queued_connections_problem()):
        return [f"{supervisor.MIGRATE_SYSCTL}: {problem}"]
    return []


def _unreadable(path: Path, what: str) -> list[tuple[Path, str]]:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return [(path, f"{what} is not readable: {exc.strerror or exc}")]
    if not os.path.isfile(path):
        return [(path, f"{what} is not a file")]
    return []
