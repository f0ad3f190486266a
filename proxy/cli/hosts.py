"""``pullgate install-hosts``: point containerd at pullgate with no fallback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.cli import hoststoml


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hosts = sub.add_parser(
        "install-hosts",
        help="write containerd certs.d/<registry>/hosts.toml files routing pulls to pullgate",
    )
    hosts.add_argument("--certs-dir", type=Path, required=True, metavar="DIR")
    hosts.add_argument("--server", default="http://127.0.0.1:5050", metavar="URL")
    hosts.add_argument(
        "--registry",
        action="append",
        metavar="NAME",
        help="registry name as containerd sees it (repeatable; default: _default, i.e. all)",
    )


def run(args: argparse.Namespace) -> int:
    registries: list[str] = args.registry or [hoststoml.DEFAULT_REGISTRY]
    try:
        for registry in registries:
            path = hoststoml.write(args.certs_dir, registry, args.server)
            print(f"wrote {path}: server {args.server}, no fallback host")
    except (hoststoml.HostsTomlError, OSError) as exc:
        print(f"pullgate install-hosts: {exc}", file=sys.stderr)
        return 2
    return 0
