"""A TLS upstream: what streaming through pullgate costs when the registry speaks https.

Real registries are reached over TLS; bench's other figures use a plain-HTTP hop, which
pullgate reads straight from the socket in a worker thread. A TLS body stays with the
event loop (uvloop's TLS, aiohttp's parser) and is handed to the worker thread in
batches. This scenario serves the same blob from a second ``docker-registry`` over TLS
(a self-signed loopback certificate, trusted through the upstream's ``caFile``) and
measures, with curl as the client and no cache:

* ``tls curl direct``: curl from the TLS registry (the client's own TLS cost included);
* ``tls curl pullgate-stream``: curl through pullgate from the TLS registry, with
  pullgate's CPU per GiB, to set beside ``curl pullgate-stream CPU`` (plain HTTP).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.peers import Pullgate, free_port

GIB = 1024**3
REGISTRY = "registry.example.test"

Record = Callable[[str, str, float], None]


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pullgate bench upstream")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream.crt", directory / "upstream.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _curl(url: str, ca: Path | None = None) -> tuple[float, int]:
    command = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download}"]
    if ca is not None:
        command += ["--cacert", str(ca)]
    out = subprocess.run(
        [*command, url], check=True, capture_output=True, text=True, timeout=3600
    ).stdout.split()
    return float(out[0]), int(out[1])


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(work: Path, storage: Path, repository: str, digest: str, size: int, reps: int,
        record: Record) -> None:  # fmt: skip
    """Serve ``storage`` (a registry's storage root holding the blob) over TLS and
    measure curl direct and through pullgate, ``reps`` times each."""
    work.mkdir(parents=True, exist_ok=True)
    cert, key = _certificate(work)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": f"127.0.0.1:{port}", "tls": {"certificate": str(cert), "key": str(key)}},
    }
    (work / "registry.yml").write_text(json.dumps(config))
    with open(work / "registry.log", "wb") as log:
        registry = subprocess.Popen(
            ["docker-registry", "serve", str(work / "registry.yml")], stdout=log, stderr=log
        )
    upstream = f"https://127.0.0.1:{port}"
    path = f"/v2/{repository}/blobs/{digest}"
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "--cacert", str(cert), f"{upstream}/v2/"],
            capture_output=True,
        ).returncode:
            if time.monotonic() > deadline or registry.poll() is not None:
                raise RuntimeError("the TLS registry did not start")
            time.sleep(0.1)
        pullgate_config = work / "pullgate.yaml"
        pullgate_config.write_text(
            f"upstreams:\n  {REGISTRY}: {{url: '{upstream}', caFile: '{cert}'}}\n"
            f"defaultUpstream: {REGISTRY}\n"
        )
        for rep in range(reps):
            seconds, got = _curl(upstream + path, ca=cert)
            assert got == size, got
            record("tls curl direct", "GB/s", size / seconds / 1e9)
            peer = Pullgate(work / f"pullgate{rep}", upstreams={}, config=pullgate_config).start()
            try:
                # A first request opens the upstream connection and its TLS session.
                _curl(f"{peer.url}/v2/")
                before = _cpu_seconds(peer.pid)
                seconds, got = _curl(f"{peer.url}{path}?ns={REGISTRY}")
                assert got == size, got
                cpu = _cpu_seconds(peer.pid) - before
            finally:
                peer.stop()
            record("tls curl pullgate-stream", "GB/s", size / seconds / 1e9)
            record("tls curl pullgate-stream CPU", "s/GiB", cpu / (size / GIB))
            print(f"  rep {rep} tls pullgate-stream {size / seconds / 1e9:6.2f} GB/s", flush=True)
    finally:
        registry.terminate()
        registry.wait(timeout=30)
