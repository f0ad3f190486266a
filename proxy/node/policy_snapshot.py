"""The last good policy, kept by the supervisor for workers that start later.

Running workers keep the policy in force when the file is edited into something that
does not load (``proxy.verify.reload``). A worker (re)started after that would read the
broken file, fail and be restarted again and again. So the supervisor keeps a copy of
the last policy that loaded in its runtime directory, and a worker whose policy file
does not load serves that copy instead (loudly), until the file loads again.

A snapshot is a directory ``policy-snapshots/<revision>/`` with

- ``policy.yaml``: the policy file's bytes;
- ``tree/``: every trust file and directory the policy names (``Policy.material``),
  copied under its absolute path (``tree/etc/pullgate/keys/release.pub``), so that the
  policy's relative paths resolve inside the copy when it is parsed with
  ``base_dir = tree/<the policy's directory>``;
- ``meta.json``: the revision, the policy's path and directory, when it was taken.

``policy-snapshot`` (a symlink, swapped atomically) names the current one. The supervisor
polls the file, and every worker that loads a revision from it takes a snapshot too: a
policy tightened and broken again between two polls of the supervisor is still the last
good one if a worker put it into force. The link only moves forward: under a lock,
``policy-snapshot.read-at`` holds when (monotonic clock) the file was read for the
snapshot it names, and a snapshot of an earlier read (a slower process) does not
replace it. A snapshot is
parsed again right after it is written and kept only if that gives the revision of the
live file: the revision is the sha256 of the YAML and of every trust file, so equal
revisions mean the copy is exactly what was validated. A worker checks it once more when
it loads it (a snapshot that does not give its recorded revision is refused), so a
damaged snapshot never loosens anything: the worker then fails as before.

Trust files named by an absolute path are outside the policy's directory tree and are
read where they are, not from the copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from proxy.verify.base import PolicyError
from proxy.verify.policy import Policy, parse_policy
from proxy.verify.reload import FileStamp, file_stamp

log = logging.getLogger("pullgate.policy")

SNAPSHOTS_DIR = "policy-snapshots"
CURRENT_LINK = "policy-snapshot"
# When the file was read for the snapshot the link names (seconds since the epoch).
READ_AT_FILE = "policy-snapshot.read-at"
LOCK_FILE = ".policy-snapshot.lock"
POLICY_FILE = "policy.yaml"
META_FILE = "meta.json"
TREE_DIR = "tree"
# Snapshots kept besides the current one (a worker may be reading the previous one).
KEEP_PREVIOUS = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A loaded snapshot: the policy and where and when it was taken."""

    policy: Policy
    directory: Path
    taken_at: float
    """Wall-clock time (seconds since the epoch) it was written."""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.taken_at))
        return f"revision {self.policy.revision[:16]} taken {when} ({self.directory})"


def _tree_path(tree: Path, path: Path) -> Path:
    """Where ``path`` (absolute) lives in the copy: lexically normalised, as the copy has
    no symlinks and ``..`` then resolves the same way."""
    normal = os.path.normpath(path)
    return tree / normal.lstrip("/")


def _copy_material(policy: Policy, base_dir: Path, tree: Path) -> None:
    _tree_path(tree, base_dir).mkdir(parents=True, exist_ok=True)
    for path in policy.material:
        if not path.is_absolute():
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # missing when the policy loaded too: the copy lacks it the same way
        target = _tree_path(tree, path)
        if stat.S_ISDIR(st.st_mode):
            target.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISREG(st.st_mode):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def take_snapshot(
    runtime: Path, policy_path: Path, raw: bytes | None = None, *, read_at: float | None = None
) -> Policy:
    """Load ``policy_path`` and keep a snapshot of it under ``runtime``; the policy.

    ``raw``: the file's bytes when the caller already read them, and ``read_at`` when
    (``time.monotonic()`` just before the read, the same clock in every process of the
    node and never stepped back; now if not given). The snapshot becomes the
    current one unless one of a later read of the file is already. PolicyError if the
    file does not load, or changed while it was copied (try again later).
    """
    if read_at is None:
        read_at = time.monotonic()
    if raw is None:
        try:
            raw = policy_path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {policy_path}: {exc.strerror or exc}") from exc
    base_dir = policy_path.resolve().parent
    source = str(policy_path)
    policy = parse_policy(raw, base_dir=base_dir, source=source)
    snapshots = runtime / SNAPSHOTS_DIR
    snapshots.mkdir(exist_ok=True)
    final = snapshots / policy.revision
    if not final.is_dir():
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=snapshots))
        try:
            tree = building / TREE_DIR
            _copy_material(policy, base_dir, tree)
            (building / POLICY_FILE).write_bytes(raw)
            meta = {
                "revision": policy.revision,
                "source": source,
                "baseDir": str(base_dir),
                "takenAt": time.time(),
            }
            (building / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            copied = parse_policy(raw, base_dir=_tree_path(tree, base_dir), source=source)
            if copied.revision != policy.revision:
                raise PolicyError(
                    f"trust files of {policy_path} changed while they were copied; "
                    "the snapshot is taken again at the next check"
                )
            try:
                building.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    fd = os.open(runtime / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = _point_to(runtime, final, read_at)
        _prune(snapshots, keep=current)
    finally:
        os.close(fd)  # releases the lock
    return policy


def _point_to(runtime: Path, snapshot: Path, read_at: float) -> Path:
    """Point the link to ``snapshot`` unless it names one of a later read of the file
    (the caller holds the lock); the snapshot it names now."""
    link = runtime / CURRENT_LINK
    order = runtime / READ_AT_FILE
    try:
        current_read_at = float(order.read_text())
    except (OSError, ValueError):
        current_read_at = float("-inf")
    if read_at < current_read_at and link.is_symlink():
        log.info(
            "policy snapshot %s not made current: the file was read again since",
            snapshot.name[:16],
        )
        return link.resolve()
    swap = runtime / f".{CURRENT_LINK}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        swap.unlink()
    swap.symlink_to(os.path.relpath(snapshot, runtime))
    swap.replace(link)
    order_swap = runtime / f".{READ_AT_FILE}.{os.getpid()}"
    order_swap.write_text(repr(read_at))
    order_swap.replace(order)
    return snapshot


def _prune(snapshots: Path, *, keep: Path) -> None:
    """Drop all but the current snapshot and the ``KEEP_PREVIOUS`` newest others."""
    others = []
    for entry in snapshots.iterdir():
        if entry.name == keep.name or entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            others.append((entry.stat().st_mtime_ns, entry))
    others.sort(reverse=True)
    for _, entry in others[KEEP_PREVIOUS:]:
        shutil.rmtree(entry, ignore_errors=True)


def load_snapshot(runtime: Path) -> Snapshot | None:
    """The current snapshot under ``runtime``, or None if there is none.

    PolicyError if there is one but it does not load or does not give the revision it
    was taken with (damaged): never a looser policy than the one validated.
    """
    link = runtime / CURRENT_LINK
    if not link.is_symlink():
        return None
    directory = link.resolve()
    try:
        meta = json.loads((directory / META_FILE).read_text())
        raw = (directory / POLICY_FILE).read_bytes()
        revision, source = str(meta["revision"]), str(meta["source"])
        base_dir, taken_at = Path(str(meta["baseDir"])), float(meta["takenAt"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"policy snapshot {directory} is unreadable: {exc}") from exc
    policy = parse_policy(raw, base_dir=_tree_path(directory / TREE_DIR, base_dir), source=source)
    if policy.revision != revision:
        raise PolicyError(
            f"policy snapshot {directory} does not match its revision {revision[:16]} "
            f"(it loads as {policy.revision[:16]}): refused"
        )
    return Snapshot(policy=policy, directory=directory, taken_at=taken_at)


class SnapshotKeeper:
    """The supervisor's side: polls the policy file and snapshots each revision that
    loads; says loudly when the file stops loading."""

    def __init__(self, *, runtime: Path, policy_path: Path, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.policy_path = policy_path
        self.interval = interval
        self.revision: str | None = None
        self._seen: tuple[tuple[FileStamp, ...], str] | None = None
        self._material: tuple[Path, ...] = ()
        self._failure: str | None = None
        self._read_at = 0.0

    def start(self) -> Policy:
        """The first snapshot, at start: PolicyError if the policy does not load."""
        return self._take(*self._read())

    def check(self) -> None:
        """Poll once: a new snapshot if the file (or a trust file) changed and loads."""
        fingerprint, raw = self._read()
        if fingerprint == self._seen:
            return
        try:
            self._take(fingerprint, raw)
        except PolicyError as exc:
            if str(exc) != self._failure:
                self._failure = str(exc)
                log.error(
                    "policy file %s does not load: %s; running workers keep revision %s and "
                    "a worker that starts serves the last good policy snapshot of it",
                    self.policy_path,
                    exc,
                    (self.revision or "none")[:16],
                )
        except OSError as exc:
            log.error("cannot snapshot the policy under %s: %s", self.runtime, exc)

    def _read(self) -> tuple[tuple[tuple[FileStamp, ...], str], bytes | None]:
        self._read_at = time.monotonic()
        stamps = tuple(file_stamp(p) for p in (self.policy_path, *self._material))
        try:
            raw: bytes | None = self.policy_path.read_bytes()
        except OSError:
            raw = None
        content = hashlib.sha256(raw).hexdigest() if raw is not None else "missing"
        return (stamps, content), raw

    def _take(self, fingerprint: tuple[tuple[FileStamp, ...], str], raw: bytes | None) -> Policy:
        if raw is None:
            raise PolicyError(f"cannot read policy {self.policy_path}")
        policy = take_snapshot(self.runtime, self.policy_path, raw, read_at=self._read_at)
        if self._failure is not None:
            log.warning("policy file %s loads again", self.policy_path)
        if policy.revision != self.revision:
            log.info(
                "policy snapshot: revision %s of %s kept for workers that start",
                policy.revision[:16],
                self.policy_path,
            )
        self.revision, self._material, self._failure = policy.revision, policy.material, None
        # Stamped with the material known before this load: when the policy names other
        # trust files now, the next poll stats them, differs, and parses once more.
        self._seen = fingerprint
        return policy
