"""Real peers for tests, the demo and the bench: docker-registry, containerd, pullgate, nginx.

Each peer runs as a subprocess on a free loopback port inside its own work dir, and is
stopped by its PID. See ../shared/PEERS.md for what works on these machines.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and stays free until a peer binds it.

    ``bind(0)`` hands out a port from the kernel's ephemeral range, which every outgoing
    connection draws from too: between this pick and the peer's bind, a client socket
    (the load or fault suites open thousands) can take it, and the peer exits with
    EADDRINUSE. Ports are therefore drawn below that range, and never twice per process.
    """
    low, _high = _ephemeral_range()
    top = min(low, 65536)
    bottom = max(1024, top - 12000)
    if top - bottom < 1000:  # an unusual range: fall back to the kernel's choice
        bottom, top = 0, 0
    for _ in range(200):
        port = random.randrange(bottom, top) if top else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_http(url: str, *, timeout: float = 20.0, process: subprocess.Popen[Any] | None = None,
              ok: Sequence[int] = (200, 401)) -> None:  # fmt: skip
    """Poll ``url`` until it answers with a status in ``ok``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


class _Process:
    """A subprocess whose output goes to a log file; stopped by PID."""

    process: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(
        self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class AccessEntry:
    method: str
    path: str
    status: int


_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


class Registry(_Process):
    """Debian's ``docker-registry`` (CNCF distribution 2.8) on a free loopback port."""

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: Mapping[str, str] | None = None,
        proxy_remote: str | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.htpasswd = dict(htpasswd or {})
        self.proxy_remote = proxy_remote
        self.log_path = workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host},
        }
        if self.htpasswd:
            import bcrypt

            lines = []
            for user, password in self.htpasswd.items():
                hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
                lines.append(f"{user}:$2y${hashed[4:]}")
            path = self.workdir / "htpasswd"
            path.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "pullgate-test", "path": str(path)}}
        if self.proxy_remote:
            config["proxy"] = {"remoteurl": self.proxy_remote}
        config_path = self.workdir / "registry.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self._spawn(["docker-registry", "serve", str(config_path)], cwd=self.workdir)
        wait_http(f"{self.url}/v2/", process=self.process)
        return self

    def access_log(self) -> list[AccessEntry]:
        entries = []
        for match in _ACCESS.finditer(self.log_text()):
            entries.append(AccessEntry(match.group(1), match.group(2), int(match.group(3))))
        return entries

    def blob_gets(self, digest: str) -> int:
        suffix = f"/blobs/{digest}"
        return sum(
            1
            for entry in self.access_log()
            if entry.method == "GET" and entry.path.split("?", 1)[0].endswith(suffix)
        )


class Pullgate(_Process):
    """``pullgate serve`` as a subprocess, with its own ports and log."""

    def __init__(
        self,
        workdir: Path,
        *,
        upstreams: Mapping[str, str],
        default_upstream: str | None = None,
        cache_dir: Path | None = None,
        policy: Path | None = None,
        config: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workers: int | None = 1,
    ) -> None:
        self.workdir = workdir
        self.workers = workers  # None: pullgate's own default (one per core)
        self.upstreams = dict(upstreams)
        self.default_upstream = default_upstream
        self.cache_dir = cache_dir
        self.policy = policy
        self.config = config
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = free_port()
        self.admin_port = free_port()
        self.log_path = workdir / "pullgate.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "proxy", "serve"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        argv += ["--listen", self.host, "--admin-listen", f"127.0.0.1:{self.admin_port}"]
        for name, url in self.upstreams.items():
            argv += ["--upstream", f"{name}={url}"]
        if self.default_upstream:
            argv += ["--default-upstream", self.default_upstream]
        if self.cache_dir is not None:
            argv += ["--cache-dir", str(self.cache_dir)]
        if self.policy is not None:
            argv += ["--policy", str(self.policy)]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        return [*argv, "--log-level", "debug", *self.extra_args]

    def start(self, timeout: float = 30.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_offset = len(self.log_text())
        self._spawn(self.argv(), cwd=ROOT, env=self.env)
        try:
            wait_http(f"{self.url}/v2/", process=self.process, timeout=timeout)
            wait_http(f"{self.admin_url}/healthz", process=self.process, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log_text()[self._log_offset :][-2000:]
            raise type(exc)(f"{exc}; pullgate's log ends with:\n{tail}") from exc
        # Printed once every worker serves (the first one answering is not enough).
        deadline = time.monotonic() + timeout
        while "pullgate: serving on" not in self.log_text()[self._log_offset :]:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"pullgate exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("pullgate did not say it is serving")
            time.sleep(0.05)
        return self

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (empty with ``workers=1``)."""
        pid = self.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        return sorted(int(child) for child in children)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def metrics(self) -> dict[str, float]:
        """Samples keyed as exposed (``name{labels}``), plus each name summed over labels."""
        with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            samples[key] = number
            if "{" in key:
                bare = key.split("{", 1)[0]
                samples[bare] = samples.get(bare, 0.0) + number
        return samples


class Containerd(_Process):
    """containerd 1.6 with its own root, state, socket and CRI config (no system paths)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "containerd.log"
        self.socket = str(workdir / "containerd.sock")
        self.certs_dir = workdir / "certs.d"

    def start(self) -> Self:
        w = self.workdir
        for sub in ("root", "state", "certs.d", "cni/net.d"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        (w / "cni/net.d/10-lo.conflist").write_text(
            '{"cniVersion":"0.4.0","name":"lo","plugins":[{"type":"loopback"}]}'
        )
        config = f"""version = 2
root = "{w}/root"
state = "{w}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.example.test/test/pause:v1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{w}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{self.certs_dir}"
"""
        (w / "containerd.toml").write_text(config)
        self._spawn(["containerd", "--config", str(w / "containerd.toml")], cwd=w)
        deadline = time.monotonic() + 20
        while True:
            done = self.ctr("version", check=False, timeout=10)
            if done.returncode == 0:
                return self
            if time.monotonic() > deadline or (self.process and self.process.poll() is not None):
                raise RuntimeError(f"containerd did not start: {done.stderr}\n{self.log_text()}")
            time.sleep(0.1)

    def write_hosts(self, registry: str, server: str, *, plain_http: bool = True) -> Path:
        """certs.d/<registry>/hosts.toml with ``server`` = pullgate and no fallback host."""
        from proxy.cli import hoststoml

        return hoststoml.write(self.certs_dir, registry, server)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.socket, "-n", "test", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def content_digests(self) -> set[str]:
        done = self.ctr("content", "ls", "-q", check=False, timeout=60)
        return {line.strip() for line in done.stdout.splitlines() if line.strip()}

    def stop(self) -> None:
        super().stop()
        # Mounts left by unpacked snapshots would keep the temp dir busy.
        subprocess.run(
            ["sh", "-c", f"grep -o ' {self.workdir}[^ ]*' /proc/mounts | xargs -r -n1 umount -l"],
            check=False,
            capture_output=True,
        )


class Nginx(_Process):
    """nginx-light serving ``root`` with sendfile, on a free loopback port."""

    def __init__(self, workdir: Path, root: Path, *, workers: int = 1) -> None:
        self.workdir = workdir
        self.root = root
        self.workers = workers
        self.port = free_port()
        self.log_path = workdir / "nginx.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.workdir.mkdir(parents=True, exist_ok=True)
        w = self.workdir
        (w / "nginx.conf").write_text(
            f"""daemon off;
user root;
worker_processes {self.workers};
pid {w}/nginx.pid;
error_log {w}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {w}/body;
  proxy_temp_path {w}/proxy;
  fastcgi_temp_path {w}/fastcgi;
  uwsgi_temp_path {w}/uwsgi;
  scgi_temp_path {w}/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
  }}
}}
"""
        )
        self._spawn([binary, "-c", str(w / "nginx.conf"), "-p", str(w)], cwd=w)
        wait_http(f"{self.url}/", process=self.process, ok=(200, 403, 404))
        return self


class Prometheus(_Process):
    """Debian's ``prometheus``, on a free loopback port, scraping ``targets`` each second."""

    def __init__(self, workdir: Path, targets: Sequence[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.targets = list(targets)
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": "pullgate", "static_configs": [{"targets": self.targets}]}
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self._spawn(
            [
                "prometheus",
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            cwd=self.workdir,
        )
        wait_http(f"{self.url}/-/ready", process=self.process, timeout=60)
        return self

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector ``expression`` evaluates to, through the HTTP API."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result
