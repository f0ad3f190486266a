"""Writes containerd ``certs.d/<registry>/hosts.toml`` files that route pulls to pullgate.

containerd falls back to the next host, and finally to ``server``, when a mirror
answers 404, any status above 399, or refuses the connection. A verifying mirror
listed as a ``[host]`` entry is therefore bypassed exactly when it refuses. pullgate
must be the ``server`` itself, with no other host listed, so a refusal is final.
``check_no_fallback`` reads a file back and refuses any that would let containerd
reach another host.

``install`` writes one registry's file and keeps what was there: a hosts.toml that
pullgate did not write is kept once as ``hosts.toml.pullgate-backup`` beside it, and a
directory pullgate made is marked ``.pullgate-created``. ``restore`` undoes both.
``diagnose`` (``pullgate doctor``) lists every directory that lets containerd bypass
pullgate, with the same reading as ``check_no_fallback``.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from proxy.oci.errors import NameInvalid
from proxy.oci.reference import validate_registry

DEFAULT_REGISTRY = "_default"
HOSTS_FILE = "hosts.toml"
BACKUP_FILE = "hosts.toml.pullgate-backup"
CREATED_MARK = ".pullgate-created"
WRITTEN_BY = "# Written by pullgate."
_TEMPORARY = ".hosts.toml.tmp"


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
        f"{WRITTEN_BY} pullgate is the server and the only host, so a refusal\n"
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
    directory = registry_dir(certs_dir, registry)
    text = render(server)
    check_no_fallback(text, server)
    directory.mkdir(parents=True, exist_ok=True)
    return _replace(directory, text)


def registry_dir(certs_dir: Path, registry: str) -> Path:
    """``certs_dir/<registry>``, refusing names that are not one registry host."""
    try:
        if registry != DEFAULT_REGISTRY:
            validate_registry(registry)
    except NameInvalid as exc:
        raise HostsTomlError(exc.message) from exc
    if not re.fullmatch(r"[A-Za-z0-9._:\-\[\]]+", registry):
        raise HostsTomlError(f"invalid registry name {registry!r}")
    return certs_dir / registry


def written_by_pullgate(data: bytes) -> bool:
    """Whether a hosts.toml's bytes are a file ``render`` wrote (any server)."""
    return data.startswith(WRITTEN_BY.encode())


def install(certs_dir: Path, registry: str, server: str) -> list[str]:
    """Write pullgate's hosts.toml for ``registry``, keeping what it replaces.

    A hosts.toml pullgate did not write is kept as BACKUP_FILE, once: a backup that
    exists is never replaced, so rerunning never loses the original. A directory made
    here gets CREATED_MARK so ``restore`` can remove it. Returns one line per action.
    """
    directory = registry_dir(certs_dir, registry)
    text = render(server)
    check_no_fallback(text, server)
    lines: list[str] = []
    if not directory.is_dir():
        directory.mkdir(parents=True)
        (directory / CREATED_MARK).write_text("made by pullgate install-hosts\n")
        lines.append(f"created {directory}")
    target = directory / HOSTS_FILE
    backup = directory / BACKUP_FILE
    existing = _read(target)
    if existing is not None and not written_by_pullgate(existing):
        if not os.path.lexists(backup):
            _keep(target, backup)
            lines.append(f"backed up {target} (not written by pullgate) to {backup}")
        elif _read(backup) != existing:
            lines.append(
                f"replacing {target}, changed since pullgate's first install; "
                f"{backup} keeps the original"
            )
    _replace(directory, text)
    lines.append(f"wrote {target}: server {server}, no fallback host")
    return lines


def restore(certs_dir: Path) -> list[str]:
    """Undo ``install`` in every directory of ``certs_dir``; one line per action.

    A backup goes back in place byte for byte (it is the original file, renamed); a
    hosts.toml pullgate wrote where there was none is removed; a directory pullgate
    made is removed when nothing else is left in it. Files pullgate never touched stay.
    """
    if not certs_dir.is_dir():
        return [f"{certs_dir}: no such directory, nothing to restore"]
    lines: list[str] = []
    for directory in sorted(p for p in certs_dir.iterdir() if p.is_dir()):
        target = directory / HOSTS_FILE
        backup = directory / BACKUP_FILE
        if os.path.lexists(backup):
            os.replace(backup, target)
            lines.append(f"restored {target} from {backup}")
        else:
            existing = _read(target)
            if existing is not None and written_by_pullgate(existing):
                target.unlink()
                lines.append(f"removed {target}: pullgate wrote it and there was none before")
        leftover = directory / _TEMPORARY
        if os.path.lexists(leftover):
            leftover.unlink()
        mark = directory / CREATED_MARK
        if os.path.lexists(mark):
            mark.unlink()
            try:
                directory.rmdir()
                lines.append(f"removed {directory}: pullgate created it")
            except OSError:
                lines.append(f"kept {directory}: pullgate created it, but it is not empty")
    if not lines:
        lines.append(f"{certs_dir}: nothing pullgate installed, nothing to restore")
    return lines


def diagnose(
    certs_dir: Path, server: str, registries: Iterable[str] = ()
) -> list[tuple[Path, str]]:
    """Every place in ``certs_dir`` that lets containerd 1.6 bypass ``server``.

    containerd uses ``certs_dir/<registry>`` when that directory exists, else
    ``_default``. A directory without a hosts.toml (or with an empty one) means the
    registry itself; a hosts.toml must pass ``check_no_fallback``. A configured
    registry without a directory of its own is fine when ``_default`` routes to
    pullgate, and a finding otherwise.
    """
    if not certs_dir.is_dir():
        return [(certs_dir, "no such directory: containerd pulls every registry directly")]
    findings: list[tuple[Path, str]] = []
    default = certs_dir / DEFAULT_REGISTRY
    if not default.is_dir():
        findings.append(
            (
                default / HOSTS_FILE,
                "missing: a registry without a directory of its own is pulled directly",
            )
        )
    default_ok = default.is_dir()
    for directory in sorted(p for p in certs_dir.iterdir() if p.is_dir()):
        target = directory / HOSTS_FILE
        try:
            data = _read(target)
            if data is None or not data.strip():
                raise HostsTomlError(
                    "no hosts.toml: containerd uses this directory and pulls from the "
                    "registry directly"
                )
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                raise HostsTomlError(f"not UTF-8: {exc}") from exc
            check_no_fallback(text, server)
        except (HostsTomlError, OSError) as exc:
            findings.append((target, str(exc)))
            if directory == default:
                default_ok = False
    for registry in sorted(set(registries)):
        directory = certs_dir / registry
        if not default_ok and not directory.is_dir():
            findings.append(
                (
                    directory / HOSTS_FILE,
                    f"configured registry {registry} has no hosts.toml and _default "
                    "does not route to pullgate",
                )
            )
    return findings


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None when there is no file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _keep(target: Path, backup: Path) -> None:
    """Make ``backup`` the very file ``target`` is (same inode, or an exact copy)."""
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(target, backup, follow_symlinks=False)


def _replace(directory: Path, text: str) -> Path:
    target = directory / HOSTS_FILE
    temporary = directory / _TEMPORARY
    temporary.write_text(text)
    os.replace(temporary, target)
    return target
