"""Hot reload of the policy file.

A ConfigMap mount swaps a ``..data`` symlink, so the file's path stays the same while
what it resolves to changes. The watcher polls: it compares the resolved path, inode,
size and mtime, then the content hash, and only then parses. A file that does not
load is refused with a log line and ``pullgate_policy_reload_failures_total``; the
policy in force stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from proxy.metrics import Metrics
from proxy.verify.base import PolicyError
from proxy.verify.gate import SignatureGate
from proxy.verify.policy import Policy, load_policy

log = logging.getLogger("pullgate.policy")


class PolicyWatcher:
    def __init__(
        self, *, path: Path, gate: SignatureGate, metrics: Metrics, interval: float = 1.0
    ) -> None:
        self._path = path
        self._gate = gate
        self._metrics = metrics
        self._interval = interval
        self._stamp = self._current_stamp()
        self._seen_hash = self._content_hash()

    def _current_stamp(self) -> tuple[str, int, int, int] | None:
        try:
            real = os.path.realpath(self._path)
            st = os.stat(real)
        except OSError:
            return None
        return (real, st.st_ino, st.st_size, st.st_mtime_ns)

    def _content_hash(self) -> str | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return None

    def load_if_changed(self) -> Policy | None:
        """The new policy if the file changed and loads; None otherwise (blocking I/O)."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        content_hash = self._content_hash()
        if content_hash is None or content_hash == self._seen_hash:
            return None
        self._seen_hash = content_hash
        try:
            return load_policy(self._path)
        except PolicyError as exc:
            self._metrics.policy_reload_failures.inc()
            log.error(
                "policy reload refused, keeping revision %s in force: %s",
                self._gate.revision,
                exc,
            )
            return None

    def check_once(self) -> bool:
        """Reload synchronously (tests); True when a new policy is now in force."""
        policy = self.load_if_changed()
        return policy is not None and self._apply(policy)

    def _apply(self, policy: Policy) -> bool:
        self._gate.replace_policy(policy)
        self._metrics.policy_reloads.inc()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                # Read and parse off the loop; swap on the loop, so requests never see
                # a half-applied policy.
                policy = await asyncio.to_thread(self.load_if_changed)
                if policy is not None:
                    self._apply(policy)
            except Exception:  # a watcher must never die: log and keep polling
                log.exception("policy watcher error")
