"""Side-by-side performance harness: ``python -m bench [--smoke] [--out DIR]``.

Every peer is started here, on loopback, in a temp dir, and measured in the same run:

* ``direct``     : the upstream ``docker-registry``;
* ``proxy-cold`` : ``docker-registry`` in proxy mode (pull-through cache), empty;
* ``nginx``      : nginx sending the same blob file with sendfile (warm-serving limit);
* ``pullgate-cold`` / ``pullgate-warm`` : pullgate with an empty cache, then a hit;
* ``pullgate-stream`` : pullgate without a cache (stream + inline sha256 only);
* ``tls`` : the same stream from a TLS upstream (``bench.tls``).

Repetitions alternate the peers' order to cancel drift; medians and min-max are
reported. Outputs ``results.json``, ``results.md`` and ``results.png`` in ``--out``.
Nothing here asserts a time: it prints figures and ratios against the goals.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import floor, tls, workers  # noqa: E402
from tests.support.ocilayout import push_blob, push_manifest, write_blob_file  # noqa: E402
from tests.support.peers import Containerd, Nginx, Pullgate, Registry  # noqa: E402

Client = Callable[[str], tuple[float, float, str]]
GIB = 1024**3
MIB = 1024**2
REGISTRY = "registry.example.test"
REPO = "bench/blob"


@dataclass
class Figure:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.samples, default=float("nan")),
            "max": max(self.samples, default=float("nan")),
            "samples": self.samples,
        }


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": GIB}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def fetch(url: str, *, headers: dict[str, str] | None = None) -> tuple[float, float, str]:
    """GET ``url`` into a reused buffer; returns (seconds, time to first byte, sha256)."""
    parts = url.split("/", 3)
    host, port = parts[2].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    buffer = bytearray(4 * MIB)
    view = memoryview(buffer)
    hasher = hashlib.sha256()
    started = time.perf_counter()
    conn.request("GET", "/" + parts[3], headers=headers or {})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET {url}: {response.status} {response.read()[:300]!r}")
    # The first read takes whatever one socket read returns: ``readinto`` would wait
    # for the whole 4 MiB buffer and so time the first 4 MiB, not the first byte.
    head = response.read1(64 * 1024)
    first = time.perf_counter() - started
    hasher.update(head)
    while True:
        count = response.readinto(view)
        if not count:
            break
        hasher.update(view[:count])
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, first, "sha256:" + hasher.hexdigest()


def curl(url: str) -> tuple[float, float, str]:
    """GET ``url`` with curl into /dev/null (no hashing on the client side); returns
    (seconds, time to first byte, "size:<bytes>")."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
         "%{time_total} %{time_starttransfer} %{size_download}", url],
        check=True, capture_output=True, text=True, timeout=3600,
    ).stdout.split()  # fmt: skip
    return float(out[0]), float(out[1]), f"size:{int(out[2])}"


def head(url: str) -> None:
    """HEAD ``url``; raise unless it answers 200."""
    parts = url.split("/", 3)
    host, port = parts[2].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("HEAD", "/" + parts[3])
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HEAD {url}: {response.status}")
    finally:
        conn.close()


def rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def rss_current_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def children_cpu() -> float:
    """CPU seconds of the bench's finished child processes (curl runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


class Bench:
    def __init__(self, work: Path, size: int, reps: int) -> None:
        self.work = work
        self.size = size
        self.reps = reps
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.restart_blobs = 100_000

    def figure(self, name: str, unit: str) -> Figure:
        return self.figures.setdefault(name, Figure(name, unit))

    def run(self, scenarios: set[str]) -> None:
        blob_file = self.work / "blob.bin"
        print(f"writing a {self.size / GIB:.2f} GiB blob ...", flush=True)
        digest = write_blob_file(blob_file, self.size, seed=1)
        registry = Registry(self.work / "registry").start()
        try:
            push_blob(registry.url, REPO, blob_file, digest=digest)
            nginx_root = self.work / "nginx-root"
            nginx_root.mkdir()
            os.link(blob_file, nginx_root / "blob.bin")
            nginx = Nginx(self.work / "nginx", nginx_root).start()
            try:
                if "pull" in scenarios:
                    self.pulls(registry, nginx, digest)
                if "fanin" in scenarios:
                    self.fan_in(registry, digest)
                if "ctr" in scenarios:
                    self.ctr_pulls(registry, digest)
                if "tls" in scenarios:
                    tls.run(
                        self.work / "tls",
                        registry.workdir / "storage",
                        REPO,
                        digest,
                        self.size,
                        self.reps,
                        lambda name, unit, value: self.figure(name, unit).samples.append(value),
                    )
                if "workers" in scenarios:
                    workers.scaling(
                        self.work,
                        registry,
                        self.size,
                        self.reps,
                        lambda name, unit, value: self.figure(name, unit).samples.append(value),
                    )
            finally:
                nginx.stop()
            if "restart" in scenarios:
                self.restart(registry)
        finally:
            registry.stop()
        if "verify" in scenarios:
            from bench.verify import run as verification_medians

            runs = 20 if self.reps == 1 else 200
            for name, median in verification_medians(runs).items():
                self.figure(f"verify: {name}", "ms").samples.append(median)
        self.floors()

    def floors(self) -> None:
        """What the machine charges per GiB, measured alone (``bench.floor``)."""
        sha = floor.sha256_cpu(self.size)
        self.figure("floor: sha256 CPU", "s/GiB").samples.append(sha)
        self.figure("sha256 (hashlib, one core)", "GB/s").samples.append(GIB / sha / 1e9)
        self.figure("floor: socket receive+send CPU", "s/GiB").samples.append(
            floor.socket_copy_cpu(self.size)
        )
        self.figure("floor: new-page write CPU", "s/GiB").samples.append(
            floor.new_page_write_cpu(self.work, self.size)
        )
        self.figure("floor: O_DIRECT write CPU", "s/GiB").samples.append(
            floor.direct_write_cpu(self.work, self.size)
        )

    def pulls(self, registry: Registry, nginx: Nginx, digest: str) -> None:
        path = f"/v2/{REPO}/blobs/{digest}"
        peers: list[tuple[str, Callable[[int], float]]] = []

        def direct(rep: int) -> float:
            seconds, ttfb, got = fetch(registry.url + path)
            assert got == digest
            self.figure("TTFB direct", "ms").samples.append(ttfb * 1000)
            return seconds

        def nginx_warm(rep: int) -> float:
            seconds, _, got = fetch(nginx.url + "/blob.bin")
            assert got == digest
            return seconds

        def proxy_cold(rep: int) -> float:
            proxy = Registry(self.work / f"proxy{rep}", proxy_remote=registry.url).start()
            try:
                seconds, _, got = fetch(proxy.url + path)
                assert got == digest
                return seconds
            finally:
                proxy.stop()
                shutil.rmtree(self.work / f"proxy{rep}", ignore_errors=True)

        def pullgate_run(
            rep: int, *, cache: bool, client: Client = fetch, label: str = ""
        ) -> tuple[float, float]:
            cache_dir = self.work / f"cache{rep}" if cache else None
            peer = Pullgate(
                self.work / f"pullgate{rep}{cache}{label}",
                upstreams={REGISTRY: registry.url},
                cache_dir=cache_dir,
            ).start()
            try:
                url = f"{peer.url}{path}?ns={REGISTRY}"
                self.figure("pullgate baseline RSS", "MiB").samples.append(
                    rss_current_kib(peer.pid) / 1024
                )
                # containerd resolves the manifest before it GETs a layer, so the layer
                # request meets a running process with an upstream connection open: a
                # HEAD of the blob stands in for that, and keeps one-off start-up work
                # (first-request imports, the first upstream connect) out of the TTFB.
                head(url)
                cpu_before = cpu_seconds(peer.pid)
                registry_before = cpu_seconds(registry.pid)
                children_before = children_cpu()
                cold, ttfb, got = client(url)
                assert got in (digest, f"size:{self.size}"), got
                cpu = cpu_seconds(peer.pid) - cpu_before
                kind = "cold" if cache else "stream"
                name = f"{label}pullgate-{kind}"
                gib = self.size / GIB
                self.figure(f"{name} CPU", "s/GiB").samples.append(cpu / gib)
                if client is curl:
                    # Everything this pull cost the machine: pullgate, the registry, curl.
                    others = cpu_seconds(registry.pid) - registry_before
                    others += children_cpu() - children_before
                    self.figure(f"{name} all processes CPU", "s/GiB").samples.append(
                        cpu / gib + others / gib
                    )
                self.figure(f"TTFB {name}", "ms").samples.append(ttfb * 1000)
                self.figure(f"{name} peak RSS", "MiB").samples.append(rss_peak_kib(peer.pid) / 1024)
                warm = float("nan")
                if cache:
                    warm, _, got = client(url)
                    assert got in (digest, f"size:{self.size}"), got
                return cold, warm
            finally:
                peer.stop()
                if cache_dir is not None:
                    shutil.rmtree(cache_dir, ignore_errors=True)

        def pullgate_cold(rep: int) -> float:
            cold, warm = pullgate_run(rep, cache=True)
            self.figure("pullgate-warm", "GB/s").samples.append(self.size / warm / 1e9)
            return cold

        def pullgate_stream(rep: int) -> float:
            return pullgate_run(rep, cache=False)[0]

        def curl_direct(rep: int) -> float:
            seconds, _, got = curl(registry.url + path)
            assert got == f"size:{self.size}", got
            return seconds

        def curl_cold(rep: int) -> float:
            return pullgate_run(rep, cache=True, client=curl, label="curl ")[0]

        def curl_stream(rep: int) -> float:
            return pullgate_run(rep, cache=False, client=curl, label="curl ")[0]

        peers = [
            ("direct", direct),
            ("nginx", nginx_warm),
            ("proxy-cold", proxy_cold),
            ("pullgate-cold", pullgate_cold),
            ("pullgate-stream", pullgate_stream),
            ("curl direct", curl_direct),
            ("curl pullgate-cold", curl_cold),
            ("curl pullgate-stream", curl_stream),
        ]
        for rep in range(self.reps):
            # Rotate the order each repetition so drift hits every peer alike.
            order = peers[rep % len(peers) :] + peers[: rep % len(peers)]
            for name, run in order:
                seconds = run(rep)
                self.figure(name, "GB/s").samples.append(self.size / seconds / 1e9)
                print(f"  rep {rep} {name:<16} {self.size / seconds / 1e9:6.2f} GB/s", flush=True)

    def ctr_pulls(self, registry: Registry, digest: str) -> None:
        """Real containerd as the client: ``ctr content fetch`` of a one-layer model whose
        layer is the blob, from the registry directly, through proxy mode, and through
        pullgate (cold), each into a fresh containerd."""
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": push_blob(registry.url, REPO, b"{}"),
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                        "digest": digest,
                        "size": self.size,
                    }
                ],
            }
        ).encode()
        push_manifest(
            registry.url, REPO, "model", manifest, "application/vnd.oci.image.manifest.v1+json"
        )

        def fetch_with(server: str, rep: int, name: str) -> float:
            containerd = Containerd(self.work / f"ctd-{name}-{rep}").start()
            try:
                containerd.write_hosts(REGISTRY, server)
                started = time.perf_counter()
                containerd.ctr(
                    "content", "fetch", "--plain-http", "--hosts-dir",
                    str(containerd.certs_dir), f"{REGISTRY}/{REPO}:model", timeout=3600,
                )  # fmt: skip
                return time.perf_counter() - started
            finally:
                containerd.stop()
                shutil.rmtree(self.work / f"ctd-{name}-{rep}", ignore_errors=True)

        for rep in range(self.reps):
            seconds = fetch_with(registry.url, rep, "direct")
            self.figure("ctr direct", "GB/s").samples.append(self.size / seconds / 1e9)
            proxy = Registry(self.work / f"ctr-proxy{rep}", proxy_remote=registry.url).start()
            try:
                seconds = fetch_with(proxy.url, rep, "proxy")
                self.figure("ctr proxy-cold", "GB/s").samples.append(self.size / seconds / 1e9)
            finally:
                proxy.stop()
                shutil.rmtree(self.work / f"ctr-proxy{rep}", ignore_errors=True)
            peer = Pullgate(
                self.work / f"ctr-pullgate{rep}",
                upstreams={REGISTRY: registry.url},
                cache_dir=self.work / f"ctr-cache{rep}",
            ).start()
            try:
                seconds = fetch_with(peer.url, rep, "pullgate")
                self.figure("ctr pullgate-cold", "GB/s").samples.append(self.size / seconds / 1e9)
            finally:
                peer.stop()
                shutil.rmtree(self.work / f"ctr-cache{rep}", ignore_errors=True)
            print(f"  rep {rep} ctr content fetch done", flush=True)

    def fan_in(self, registry: Registry, digest: str, clients: int = 32) -> None:
        path = f"/v2/{REPO}/blobs/{digest}"
        before = registry.blob_gets(digest)
        peer = Pullgate(
            self.work / "pullgate-fanin",
            upstreams={REGISTRY: registry.url},
            cache_dir=self.work / "cache-fanin",
        ).start()
        try:
            results: list[str] = []
            lock = threading.Lock()

            def client() -> None:
                _, _, got = fetch(f"{peer.url}{path}?ns={REGISTRY}")
                with lock:
                    results.append(got)

            threads = [threading.Thread(target=client) for _ in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            upstream_bytes = peer.metrics().get("pullgate_upstream_bytes_total", float("nan"))
        finally:
            peer.stop()
            shutil.rmtree(self.work / "cache-fanin", ignore_errors=True)
        gets = registry.blob_gets(digest) - before
        correct = sum(1 for r in results if r == digest)
        self.figure("fan-in upstream GETs", "count").samples.append(gets)
        self.figure("fan-in upstream bytes / blob", "x").samples.append(upstream_bytes / self.size)
        self.figure("fan-in aggregate", "GB/s").samples.append(clients * self.size / elapsed / 1e9)
        self.notes.append(f"fan-in: {correct}/{clients} clients got correct bytes")
        print(f"  fan-in: {gets} upstream GET(s), {correct}/{clients} correct", flush=True)

    def restart(self, registry: Registry) -> None:
        blobs = self.restart_blobs
        cache = self.work / "cache-restart"
        directory = cache / "blobs" / "sha256"
        directory.mkdir(parents=True)
        for number in range(blobs):
            data = number.to_bytes(8, "big")
            (directory / hashlib.sha256(data).hexdigest()).write_bytes(data)
        for rep in range(self.reps):
            peer = Pullgate(
                self.work / f"pullgate-restart{rep}",
                upstreams={REGISTRY: registry.url},
                cache_dir=cache,
            )
            started = time.perf_counter()
            peer.start(timeout=120)
            self.figure(f"restart with {blobs} blobs", "s").samples.append(
                time.perf_counter() - started
            )
            peer.stop()
        shutil.rmtree(cache, ignore_errors=True)


GOALS = [
    ("cold pull vs direct", "pullgate-cold", "direct", 0.90),
    ("cold pull vs registry proxy cold", "pullgate-cold", "proxy-cold", 1.25),
    ("warm pull vs nginx", "pullgate-warm", "nginx", 0.90),
    ("stream (no cache) vs direct", "pullgate-stream", "direct", 0.90),
    ("ctr cold pull vs ctr direct", "ctr pullgate-cold", "ctr direct", 0.90),
    ("ctr cold pull vs ctr registry proxy cold", "ctr pullgate-cold", "ctr proxy-cold", 1.25),
]


def floor_ratios(bench: Bench) -> list[dict[str, Any]]:
    """pullgate's CPU per GiB against the floor of its path, and curl throughput
    against the verifying limit, all from figures of this run."""
    fig = bench.figures

    def median(name: str) -> float | None:
        return fig[name].median if name in fig and fig[name].samples else None

    sha = median("floor: sha256 CPU")
    copy = median("floor: socket receive+send CPU")
    write = median("floor: new-page write CPU")
    ratios: list[dict[str, Any]] = []
    if sha is None or copy is None or write is None:
        return ratios
    stream_floor = sha + copy
    fill_floor = stream_floor + write
    bench.notes.append(
        f"floors per GiB: stream {stream_floor:.2f} CPU-s (sha256 {sha:.2f} + socket "
        f"receive+send {copy:.2f}); fill {fill_floor:.2f} (+ new-page write {write:.2f})"
    )
    direct_write = median("floor: O_DIRECT write CPU")
    checks = [
        ("stream CPU vs floor (sha256 + receive + send)", "pullgate-stream CPU", stream_floor),
        ("fill CPU vs floor (+ new-page write)", "pullgate-cold CPU", fill_floor),
        ("curl stream CPU vs floor", "curl pullgate-stream CPU", stream_floor),
        ("curl fill CPU vs floor", "curl pullgate-cold CPU", fill_floor),
    ]
    if direct_write is not None and direct_write == direct_write:  # not NaN
        # Big blobs are written with O_DIRECT: the floor of that path, stricter.
        checks.append(
            ("fill CPU vs O_DIRECT floor (+ direct write)", "pullgate-cold CPU",
             stream_floor + direct_write)
        )  # fmt: skip
    for label, name, floor_value in checks:
        value = median(name)
        if value is not None:
            ratio = value / floor_value
            ratios.append(
                {"measure": label, "ratio": ratio, "goal": 1.3, "met": ratio <= 1.3,
                 "at_most": True}
            )  # fmt: skip
    tls_cpu, plain_cpu = median("tls curl pullgate-stream CPU"), median("curl pullgate-stream CPU")
    if tls_cpu is not None:
        # No goal: the floor above has no TLS in it (decryption is the upstream hop's).
        plain = f", {plain_cpu:.2f} from a plain-HTTP upstream" if plain_cpu is not None else ""
        bench.notes.append(
            f"TLS upstream: pullgate streams at {tls_cpu:.2f} CPU-s per GiB{plain} "
            f"({tls_cpu / stream_floor:.2f}x the plain stream floor)"
        )
    direct = median("curl direct")
    sha_rate = GIB / sha / 1e9
    if direct is not None:
        limit = min(direct, sha_rate)
        fill_limit = min(limit, GIB / write / 1e9)
        bench.notes.append(
            f"verifying limit min(curl direct {direct:.2f}, sha256 {sha_rate:.2f}) = "
            f"{limit:.2f} GB/s; with a fill, min(that, new-page write "
            f"{GIB / write / 1e9:.2f}) = {fill_limit:.2f} GB/s"
        )
        for kind in ("stream", "cold"):
            total = median(f"curl pullgate-{kind} all processes CPU")
            if total:
                cores = os.cpu_count() or 1
                bench.notes.append(
                    f"curl pullgate-{kind}: pullgate, registry and curl together spend "
                    f"{total:.2f} CPU-s per GiB, so {cores} cores bound it at "
                    f"{cores * GIB / total / 1e9:.2f} GB/s"
                )
        for label, name, bound, goal in (
            ("curl stream vs verifying limit", "curl pullgate-stream", limit, 0.75),
            ("curl fill vs limit incl. new pages", "curl pullgate-cold", fill_limit, 0.0),
        ):
            value = median(name)
            if value is not None:
                ratio = value / bound
                ratios.append(
                    {"measure": label, "ratio": ratio, "goal": goal, "met": ratio >= goal}
                )
    return ratios


def worker_ratios(bench: Bench) -> list[dict[str, Any]]:
    """Warm aggregate with N workers against N x one worker (goal 0.8), and cold and
    warm against nginx with the same worker count."""
    fig = bench.figures
    ratios: list[dict[str, Any]] = []
    one = fig.get("workers 1: pullgate warm, resident")
    count = 1
    while f"workers {count}: nginx" in fig:  # 1, 2, 4, ...
        nginx = fig[f"workers {count}: nginx"].median
        warm = fig[f"workers {count}: pullgate warm"].median
        resident = fig[f"workers {count}: pullgate warm, resident"].median
        cold = fig[f"workers {count}: pullgate cold"].median
        if one is not None and count > 1:
            ratio = resident / (count * one.median)
            ratios.append(
                {"measure": f"warm resident, {count} workers vs {count} x one worker",
                 "ratio": ratio, "goal": 0.8, "met": ratio >= 0.8}
            )  # fmt: skip
        for kind, value in (("warm resident", resident), ("warm O_DIRECT", warm), ("cold", cold)):
            ratio = value / nginx
            goal = 0.9 if kind == "warm resident" else 0.0
            ratios.append(
                {"measure": f"{kind}, {count} workers vs nginx with {count}", "ratio": ratio,
                 "goal": goal, "met": ratio >= goal}
            )  # fmt: skip
        count *= 2
    return ratios


def report(bench: Bench, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: f.as_dict() for name, f in bench.figures.items()}
    ratios = []
    for label, a, b, goal in GOALS:
        if a in bench.figures and b in bench.figures:
            ratio = bench.figures[a].median / bench.figures[b].median
            ratios.append({"measure": label, "ratio": ratio, "goal": goal, "met": ratio >= goal})
    ratios += floor_ratios(bench)
    ratios += worker_ratios(bench)
    result = {
        "machine": machine(),
        "blob_bytes": bench.size,
        "reps": bench.reps,
        "figures": figures,
        "ratios": ratios,
        "notes": bench.notes,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Machine: {result['machine']}",
        "",
        f"Blob {bench.size / GIB:.2f} GiB, {bench.reps} repetitions (median, min-max).",
        "",
        "| measure | unit | median | min | max |",
        "|---|---|---|---|---|",
    ]
    for f in figures.values():
        lines.append(
            f"| {f['name']} | {f['unit']} | {f['median']:.3f} | {f['min']:.3f} | {f['max']:.3f} |"
        )
    lines += ["", "| ratio | measured | goal | met |", "|---|---|---|---|"]
    for r in ratios:
        bound = "≤" if r.get("at_most") else "≥"
        lines.append(
            f"| {r['measure']} | {r['ratio']:.2f}x | {bound} {r['goal']:.2f}x | "
            f"{'yes' if r['met'] else 'no'} |"
        )
    lines += ["", *bench.notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n, f in bench.figures.items() if f.unit == "GB/s"]
        medians = [bench.figures[n].median for n in names]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names, medians)
        ax.set_xlabel("GB/s (median)")
        ax.set_title(f"pullgate vs peers, {bench.size / GIB:.2f} GiB blob")
        fig.tight_layout()
        fig.savefig(out / "results.png")
        plt.close(fig)
    except ImportError:
        bench.notes.append("matplotlib missing: no chart")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run to keep the harness working")
    parser.add_argument("--size", default="1G", help="blob size (default 1G)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--only",
        default="pull,ctr,fanin,workers,restart,verify,tls",
        help="comma list of pull, ctr, fanin, workers, restart, verify, tls",
    )
    args = parser.parse_args(argv)
    size = 16 * MIB if args.smoke else parse_size(args.size)
    reps = 1 if args.smoke else args.reps
    scenarios = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="pullgate-bench-"))
    try:
        free = shutil.disk_usage(work).free
        if free < 4 * size:
            print(f"not enough disk in {work}: {free / GIB:.1f} GiB free", file=sys.stderr)
            return 2
        bench = Bench(work, size, reps)
        if args.smoke:
            bench.restart_blobs = 1000
        bench.run(scenarios)
        report(bench, args.out)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
