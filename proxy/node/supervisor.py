"""The worker supervisor: ``pullgate serve --workers N`` with N > 1.

A small parent process that serves nothing itself. It

1. makes a fresh private runtime directory (mode 0700) under ``runtimeDir`` (default:
   the temp dir) for the node's shared allowance store and the workers' metrics files
   (``PROMETHEUS_MULTIPROC_DIR``), and removes it when it exits;
2. checks that the registry and admin ports are free, so that a stale pullgate holding
   them with ``SO_REUSEPORT`` cannot silently take a share of the connections;
3. starts N workers (``python -m proxy.node.worker``), each the full app (``proxy.node``)
   on the same ports, and waits until every one serves; if one fails first, it stops
   the others and exits with that worker's code (2: configuration or policy error);
4. keeps a snapshot of the last good policy in the runtime directory (polled like the
   workers poll the file; ``proxy.node.policy_snapshot``), so that a worker started
   while the policy file does not load serves that instead of failing again and again;
5. restarts a worker that dies, after a backoff that doubles with each quick failure
   (``BACKOFF_FIRST`` up to ``BACKOFF_MAX``; reset once a worker ran ``STABLE_AFTER``
   seconds), logging why, and tells prometheus-client the dead process is gone;
6. on SIGTERM or SIGINT stops restarting, sends SIGTERM to every worker, waits for them
   to finish what is in flight (SIGKILL after ``STOP_TIMEOUT``, or at a second
   signal), and exits 0 if they all stopped by themselves.

Each worker reaches the supervisor through a socketpair on its stdin: it reads its spec
(the validated config and its role) there, writes ``ready`` once it serves, and stops
gracefully when the supervisor goes away (end of file), so no worker outlives it.

The config was read once by the command line; the CA files it names are read once too,
here (``proxy.node.config_files``), so a restarted worker trusts what the others do
even if a file was broken since; the docker config is copied as it loaded at start, for
a worker that starts while the file does not load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from proxy.config import Config, ConfigError
from proxy.metrics import MULTIPROC_ENV
from proxy.node import (
    ALLOWANCES_FILE,
    METRICS_DIR,
    SHUTDOWN_GRACE,
    CriEndpoints,
    Role,
    announce_serving,
    describe,
)
from proxy.node.config_files import keep_docker_config, pin_ca_files
from proxy.node.policy_snapshot import SnapshotKeeper
from proxy.pipeline.shared import SharedAllowances
from proxy.verify.base import PolicyError

log = logging.getLogger("pullgate.supervisor")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
STOP_TIMEOUT = SHUTDOWN_GRACE + 10.0
READY = b"ready\n"
# Linux 5.14+: connections queued on a listener that closes (a worker that died) move to
# a sibling listener of the same SO_REUSEPORT group instead of being reset.
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to run: sent to it over its channel at start."""

    config: Config
    role: Role
    cri: CriEndpoints | None


def send_spec(channel: socket.socket, spec: WorkerSpec) -> None:
    payload = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    channel.sendall(_LENGTH.pack(len(payload)) + payload)


def receive_spec(channel: socket.socket) -> WorkerSpec:
    """The spec the supervisor sent (the channel is a socketpair only it holds)."""
    header = _receive_exactly(channel, _LENGTH.size)
    spec = pickle.loads(_receive_exactly(channel, _LENGTH.unpack(header)[0]))
    if not isinstance(spec, WorkerSpec):
        raise TypeError("the supervisor sent no worker spec")
    return spec


def _receive_exactly(channel: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = channel.recv(size - len(data))
        if not chunk:
            raise EOFError("the supervisor closed the channel")
        data += chunk
    return data


@dataclass(slots=True)
class _Slot:
    """One worker position: the process filling it now, and its restart history."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    started_at: float = 0.0
    ready: bool = False
    quick_failures: int = 0
    restart_at: float | None = None
    received: bytes = b""


class Supervisor:
    def __init__(self, config: Config, *, workers: int, cri: CriEndpoints | None) -> None:
        if workers < 2:
            raise ValueError("the supervisor runs two workers or more")
        self.config = config
        self.workers = workers
        self.cri = cri
        self._slots = [_Slot(index) for index in range(workers)]
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._runtime: Path | None = None
        self._snapshots: SnapshotKeeper | None = None
        self._next_snapshot_check = 0.0
        self._worker_env: dict[str, str] = {}
        # Pull grants sealed by the CRI front end (worker 0) open in every worker.
        self._grant_key = os.urandom(32)

    # -- the whole life --------------------------------------------------------------

    def run(self) -> int:
        """Run the workers until SIGTERM/SIGINT; the process exit code."""
        try:
            self._check_ports_free()
        except OSError as exc:
            print(f"pullgate: {exc}", file=sys.stderr)
            return 1
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        old_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        self._selector.register(wakeup_read, selectors.EVENT_READ, None)
        try:
            self._runtime = self._make_runtime_dir()
            log.info("%s", describe(self.config, self.workers))
            log.info("runtime directory %s", self._runtime)
            try:
                self.config = pin_ca_files(self.config, self._runtime)
                keep_docker_config(self.config, self._runtime)
            except ConfigError as exc:
                log.error("configuration error: %s", exc)
                print(f"pullgate: configuration error: {exc}", file=sys.stderr)
                return 2
            except OSError as exc:
                print(f"pullgate: cannot copy files to {self._runtime}: {exc}", file=sys.stderr)
                return 1
            if self.config.policy is not None:
                self._snapshots = SnapshotKeeper(
                    runtime=self._runtime, policy_path=self.config.policy
                )
                try:
                    self._snapshots.start()
                except PolicyError as exc:
                    log.error("policy error: %s", exc)
                    print(f"pullgate: policy error: {exc}", file=sys.stderr)
                    return 2
                except OSError as exc:  # the workers load the file themselves
                    log.error(
                        "cannot keep a policy snapshot in %s (%s): a worker started while the "
                        "policy file does not load will fail to start",
                        self._runtime,
                        exc,
                    )
                self._next_snapshot_check = time.monotonic() + self._snapshots.interval
            if (problem := queued_connections_problem()) is not None:
                log.warning("%s", problem)
            code = self._start_all()
            if code is None:
                announce_serving(self.config, f" with {self.workers} workers")
                self._supervise()
                code = 0
            return self._stop_all(code)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
            wakeup_read.close()
            wakeup_write.close()
            if self._runtime is not None:
                shutil.rmtree(self._runtime, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _make_runtime_dir(self) -> Path:
        base = self.config.runtime_dir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        runtime = Path(tempfile.mkdtemp(prefix="pullgate-", dir=base))  # mode 0700
        metrics_dir = runtime / METRICS_DIR
        metrics_dir.mkdir()
        # Only the workers read it (they are started with it in their environment).
        self._worker_env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
        if self.config.policy is not None:
            SharedAllowances.create(
                runtime / ALLOWANCES_FILE,
                restore_pending=self.config.cache.dir is not None,
            )
        return runtime

    def _check_ports_free(self) -> None:
        """Bind each port once without SO_REUSEPORT: fails if anything listens there."""
        addresses = [(self.config.listen_host, self.config.listen_port)]
        if self.config.admin_listen is not None:
            addresses.append(self.config.admin_listen)
        for host, port in addresses:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc}") from exc

    # -- starting ----------------------------------------------------------------------

    def _start_all(self) -> int | None:
        """Start every worker and wait until all serve; an exit code if one failed."""
        for slot in self._slots:
            self._spawn(slot)
        while not all(slot.ready for slot in self._slots):
            if self._signals:
                log.info("stopped while starting")
                return 0
            for slot, gone in self._poll(None):
                if gone:
                    code = self._reap(slot)
                    log.error("worker %d failed to start (%s)", slot.index, _how(code))
                    return code if code and code > 0 else 1
        return None

    def _spawn(self, slot: _Slot) -> None:
        assert self._runtime is not None
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy.node.worker"],
                stdin=theirs.fileno(),
                env=self._worker_env,
                close_fds=True,
            )
        finally:
            theirs.close()
        role = Role(
            index=slot.index,
            workers=self.workers,
            runtime_dir=self._runtime,
            grant_key=self._grant_key,
        )
        with contextlib.suppress(OSError):  # it died at once: its end of file tells
            send_spec(ours, WorkerSpec(config=self.config, role=role, cri=self.cri))
        ours.setblocking(False)
        slot.process, slot.channel = process, ours
        slot.started_at, slot.ready, slot.received = time.monotonic(), False, b""
        slot.restart_at = None
        self._selector.register(ours, selectors.EVENT_READ, slot)
        log.info("worker %d started (pid %d)", slot.index, process.pid)

    # -- supervising -------------------------------------------------------------------

    def _supervise(self) -> None:
        """Restart workers that die, until a signal asks to stop."""
        while not self._signals:
            now = time.monotonic()
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
            if self._snapshots is not None:
                due.append(self._next_snapshot_check)
            timeout = max(0.0, min(due) - now) if due else None
            for slot, gone in self._poll(timeout):
                if gone:
                    self._worker_died(slot)
            now = time.monotonic()
            if self._snapshots is not None and now >= self._next_snapshot_check:
                self._check_policy(self._snapshots)
                now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at and not self._signals:
                    self._spawn(slot)

    def _check_policy(self, snapshots: SnapshotKeeper) -> None:
        try:
            snapshots.check()
        except Exception:  # the supervisor must not die of it: log and poll again
            log.exception("policy snapshot check failed")
        self._next_snapshot_check = time.monotonic() + snapshots.interval

    def _worker_died(self, slot: _Slot) -> None:
        lived = time.monotonic() - slot.started_at
        pid = slot.process.pid if slot.process is not None else 0
        code = self._reap(slot)
        if lived >= STABLE_AFTER:
            slot.quick_failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**slot.quick_failures)
        slot.quick_failures += 1
        slot.restart_at = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
            slot.index,
            pid,
            _how(code),
            lived,
            delay,
        )

    def _poll(self, timeout: float | None) -> list[tuple[_Slot, bool]]:
        """Wait for channel traffic or a signal: (slot, gone) for each worker heard."""
        heard: list[tuple[_Slot, bool]] = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    key.fileobj.recv(4096)  # type: ignore[union-attr]
                continue
            slot: _Slot = key.data
            assert slot.channel is not None
            try:
                data = slot.channel.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                heard.append((slot, True))
                continue
            slot.received += data
            if READY in slot.received and not slot.ready:
                slot.ready = True
                log.info("worker %d ready", slot.index)
            slot.received = slot.received[-len(READY) :]
        return heard

    def _reap(self, slot: _Slot) -> int | None:
        """Wait for the slot's process to end; its return code (negative: signal)."""
        if slot.channel is not None:
            self._selector.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None
        process, slot.process = slot.process, None
        slot.ready = False
        if process is None:
            return None
        try:
            code = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Closed its channel yet kept running: it is no worker of ours any more.
            process.kill()
            code = process.wait()
        self._process_gone(process.pid)
        return code

    def _process_gone(self, pid: int) -> None:
        """Drop the dead worker's live gauges from the shared metrics."""
        from prometheus_client import multiprocess

        assert self._runtime is not None
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self._runtime / METRICS_DIR))  # type: ignore[no-untyped-call]

    # -- stopping ----------------------------------------------------------------------

    def _stop_all(self, code: int) -> int:
        """SIGTERM every worker and wait; SIGKILL stragglers. ``code``, or 1 if any
        had to be killed."""
        live = [s for s in self._slots if s.process is not None]
        for slot in live:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGTERM)
        if live:
            log.info("stopping %d workers", len(live))
        signals_seen = len(self._signals)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(s.process is not None for s in self._slots):
            left = deadline - time.monotonic()
            if left <= 0 or len(self._signals) > signals_seen:
                break  # out of time, or asked again: no more waiting
            for slot, gone in self._poll(left):
                if gone:
                    self._reap(slot)
        killed = False
        for slot in self._slots:
            if slot.process is not None:
                log.error("worker %d did not stop in time: killing it", slot.index)
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
                self._reap(slot)
                killed = True
        log.info("stopped")
        return 1 if killed and code == 0 else code


def queued_connections_problem() -> str | None:
    """Why connections queued on a worker that dies would be reset, or None if they move.

    Each worker listens on its own SO_REUSEPORT socket; the kernel queues a new
    connection on one of them before the worker accepts it. Unless
    ``net.ipv4.tcp_migrate_req`` is 1, the connections still queued on a worker that
    dies are reset (containerd retries, but the pull pays for it).
    """
    sysctl = MIGRATE_SYSCTL
    try:
        value = sysctl.read_text().strip()
    except OSError:
        return (
            "this kernel cannot move queued connections between workers "
            f"({sysctl} is missing: Linux 5.14 or later has it): connections queued on a "
            "worker that dies are reset"
        )
    if value == "1":
        return None
    return (
        f"net.ipv4.tcp_migrate_req is {value}: connections queued on a worker that dies are "
        "reset instead of moving to another worker; set it to 1 on the node "
        "(sysctl -w net.ipv4.tcp_migrate_req=1)"
    )


def _how(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
