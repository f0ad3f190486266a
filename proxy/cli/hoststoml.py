"""Writes containerd ``certs.d/<registry>/hosts.toml`` files that route pulls to pullgate.

containerd falls back to the next host, and finally to ``server``, when a mirror
answers 404, any status above 399, or refuses the connection. A verifying mirror
listed as a ``[host]`` entry is therefore bypassed exactly when it refuses. pullgate
must be the ``server`` itself, with no other host listed, so a refusal is final.
``check_no_fallback`` reads a file back and refuses any that would let containerd
reach another host.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from proxy.oci.errors import NameInvalid
from proxy.oci.reference import validate_registry

DEFAULT_REGISTRY = "_default"


class HostsTomlError(ValueError):
    """A hosts.toml that would let containerd bypass pullgate, or bad arguments."""


def render(server: str) -> str:
    """The hosts.toml text that makes ``server`` (pullgate's URL) the only host."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise HostsTomlError(f"server must be an http(s) URL with no path, got {server!r}")
    url = f"{parts.scheme}://{parts.netloc}"
    # 1. `server` is pullgate: containerd's last resort is the mirror itself.
    # 2. The one [host] table is pullgate too (containerd 1.6 refuses a file without a
    #    host tree), so every host containerd may try is pullgate.
    return (
        "# Written by pullgate. pullgate is the server and the only host, so a refusal\n"
        "# cannot be bypassed by falling back to the upstream registry.\n"
        f'server = "{url}"\n'
        "\n"
        f'[host."{url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def check_no_fallback(text: str, server: str) -> None:
    """Raise HostsTomlError unless ``text`` routes every pull to ``server`` alone."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsTomlError(f"not valid TOML: {exc}") from exc
    want = server.rstrip("/")
    got = str(doc.get("server", "")).rstrip("/")
    if got != want:
        raise HostsTomlError(f"server is {got or 'unset'!r}, not pullgate at {want!r}")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsTomlError("host must be a table of host URLs")
    others = [h for h in hosts if str(h).rstrip("/") != want]
    if others:
        raise HostsTomlError(f"extra hosts let containerd fall back: {', '.join(others)}")


def write(certs_dir: Path, registry: str, server: str) -> Path:
    """Atomically write ``certs_dir/<registry>/hosts.toml``; returns its path."""
    try:
        if registry != DEFAULT_REGISTRY:
            validate_registry(registry)
    except NameInvalid as exc:
        raise HostsTomlError(exc.message) from exc
    if not re.fullmatch(r"[A-Za-z0-9._:\-\[\]]+", registry):
        raise HostsTomlError(f"invalid registry name {registry!r}")
    text = render(server)
    check_no_fallback(text, server)
    directory = certs_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "hosts.toml"
    temporary = directory / ".hosts.toml.tmp"
    temporary.write_text(text)
    os.replace(temporary, target)
    return target
