"""Hot reload of the policy file.

A ConfigMap mount swaps a ``..data`` symlink, so the file's path stays the same while
what it resolves to changes. The watcher polls (every second by default): it stats the
resolved policy path and every trust file the policy names, and hashes the policy's
bytes. When any of that changed it parses the new file; a new revision is swapped in
atomically (on the event loop, between requests). A file that does not load is refused
with a log line and ``pullgate_policy_reload_failures_total`` (once per distinct failure);
the policy in force stays, and the file is tried again at every poll, so a policy that
names a key mounted a little later (a Secret beside a ConfigMap) goes into force then.

A worker that started while the file did not load serves the supervisor's snapshot of
the last good policy (``proxy.node.policy_snapshot``; ``snapshot`` names it here and
``pullgate_policy_snapshot_in_use`` counts it) until the file loads again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from proxy.metrics import Metrics
from proxy.verify.base import PolicyError
from proxy.verify.policy import Policy, parse_policy
from proxy.verify.signature_gate import SignatureGate

log = logging.getLogger("pullgate.policy")

FileStamp = tuple[str, int, int, int] | tuple[str]
Fingerprint = tuple[tuple[FileStamp, ...], str]


def file_stamp(path: Path) -> FileStamp:
    """What identifies a file's version cheaply: its resolved path, inode, size, mtime."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError):
        return (str(path),)
    return (real, st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyWatcher:
    """Polls the policy file (and its trust files) and swaps new revisions into a gate."""

    def __init__(
        self,
        *,
        path: Path,
        gate: SignatureGate,
        metrics: Metrics,
        interval: float = 1.0,
        snapshot: str | None = None,
        on_loaded: Callable[[bytes, float], None] | None = None,
    ) -> None:
        """``snapshot``: what the gate serves instead of the file (a description), when
        this process started while the file did not load. ``on_loaded``: called with
        the file's bytes and when they were read (``time.monotonic()``) each time a new
        version of it loads (the node keeps its snapshot of the last good policy)."""
        self._on_loaded = on_loaded
        self._path = path
        self._gate = gate
        self._metrics = metrics
        self.interval = interval
        # None: the first poll parses the file once more, so a change made between the
        # gate's load and the watcher's start is not missed (same revision: no swap).
        self._seen: Fingerprint | None = None
        self._failure: tuple[Fingerprint, str] | None = None
        # The trust files of the policy last loaded from the file (stat'ed each poll).
        # Not the gate's: a gate that serves a snapshot holds copies' paths, and keeps
        # them when the file loads again with the same revision.
        self._material = gate.policy.material
        self.snapshot = snapshot
        if snapshot is not None:
            metrics.policy_snapshot_in_use.set(1)

    def _read(self) -> tuple[Fingerprint, bytes | None]:
        stamps = tuple(file_stamp(p) for p in (self._path, *self._material))
        try:
            raw: bytes | None = self._path.read_bytes()
        except OSError:
            raw = None
        content = hashlib.sha256(raw).hexdigest() if raw is not None else "missing"
        return (stamps, content), raw

    def load_if_changed(self) -> Policy | None:
        """The policy if the file or its trust files changed and it loads; else None.

        Blocking I/O: run it in a thread.
        """
        read_at = time.monotonic()
        fingerprint, raw = self._read()
        if fingerprint == self._seen:
            return None
        try:
            if raw is None:
                raise PolicyError(f"cannot read policy {self._path}")
            policy = parse_policy(raw, base_dir=self._path.resolve().parent, source=str(self._path))
        except PolicyError as exc:
            # Not marked seen: the next poll tries again (what it names may appear).
            failure = (fingerprint, str(exc))
            if failure != self._failure:
                self._failure = failure
                self._metrics.policy_reload_failures.inc()
                log.error(
                    "policy reload REFUSED, revision %s stays in force%s: %s",
                    self._gate.revision[:16],
                    "" if self.snapshot is None else f" (the snapshot {self.snapshot})",
                    exc,
                )
            return None
        self._seen = fingerprint
        self._failure = None
        self._material = policy.material
        if self._on_loaded is not None:
            try:
                self._on_loaded(raw, read_at)
            except Exception:  # the policy goes into force all the same
                log.exception("could not keep a snapshot of policy %s", self._path)
        if self.snapshot is not None:
            log.warning(
                "policy file %s loads again (revision %s): leaving the snapshot %s",
                self._path,
                policy.revision[:16],
                self.snapshot,
            )
            self.snapshot = None
            self._metrics.policy_snapshot_in_use.set(0)
        return policy  # apply() swaps it in only if its revision is not in force already

    def apply(self, policy: Policy) -> bool:
        """Swap ``policy`` into the gate (on the event loop); True if it is new."""
        if not self._gate.replace_policy(policy):
            return False
        self._metrics.policy_reloads.inc()
        return True

    def check_once(self) -> bool:
        """Poll once, synchronously; True when a new policy is now in force."""
        policy = self.load_if_changed()
        return policy is not None and self.apply(policy)

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                # Read and parse off the loop; swap on it, so no request sees a
                # half-applied policy.
                policy = await asyncio.to_thread(self.load_if_changed)
                if policy is not None:
                    self.apply(policy)
            except Exception:  # the watcher must never die: log and keep polling
                log.exception("policy watcher error")
