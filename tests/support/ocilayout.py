"""Build and push OCI content to a local test registry, without Docker.

Images are real (gzip'd tar layers, a config whose ``rootfs.diff_ids`` match), so
containerd can unpack them. Model artifacts follow the ModelPack shape: an
``artifactType``, the empty config, one raw layer per file titled with its name.
Pushes use the distribution API over plain HTTP, streaming big files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import random
import subprocess
import tarfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
CHUNK = 4 << 20


def deterministic_bytes(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed (fast: one randbytes call)."""
    return random.Random(seed).randbytes(size)


def write_blob_file(path: Path, size: int, seed: int) -> str:
    """Stream a big pseudo-random blob to ``path``; returns its ``sha256:`` digest."""
    rng = random.Random(seed)
    hasher = hashlib.sha256()
    remaining = size
    with open(path, "wb") as out:
        block = rng.randbytes(min(CHUNK, size)) if size else b""
        counter = 0
        while remaining > 0:
            # Vary each chunk cheaply so the file does not repeat (and cannot dedupe).
            piece = counter.to_bytes(8, "big") + block[8:]
            piece = piece[: min(remaining, len(piece))]
            out.write(piece)
            hasher.update(piece)
            remaining -= len(piece)
            counter += 1
    return f"sha256:{hasher.hexdigest()}"


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass
class PushedArtifact:
    repository: str
    tag: str
    manifest_digest: str
    manifest_bytes: bytes
    media_type: str
    blobs: dict[str, int] = field(default_factory=dict)
    layer_digests: list[str] = field(default_factory=list)


def _connection(registry_url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(registry_url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=300), parts.path


def push_blob(
    registry_url: str, repo: str, data: bytes | Path, *, digest: str | None = None
) -> str:
    """Monolithic upload (POST then PUT ?digest=); streams files. Returns the digest."""
    if digest is None:
        if isinstance(data, Path):
            hasher = hashlib.sha256()
            with open(data, "rb") as source:
                while chunk := source.read(CHUNK):
                    hasher.update(chunk)
            digest = f"sha256:{hasher.hexdigest()}"
        else:
            digest = sha256_digest(data)
    conn, _ = _connection(registry_url)
    try:
        conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        head = conn.getresponse()
        head.read()
        if head.status == 200:
            return digest
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        started = conn.getresponse()
        started.read()
        if started.status != 202:
            raise RuntimeError(f"upload start failed: {started.status}")
        location = urllib.parse.urlsplit(started.headers["Location"])
        query = location.query + ("&" if location.query else "") + f"digest={digest}"
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(data, Path):
            with open(data, "rb") as body:
                conn.request("PUT", f"{location.path}?{query}", body=body, headers=headers)
                done = conn.getresponse()
        else:
            conn.request("PUT", f"{location.path}?{query}", body=data, headers=headers)
            done = conn.getresponse()
        done.read()
        if done.status != 201:
            raise RuntimeError(f"blob upload of {digest} failed: {done.status}")
        return digest
    finally:
        conn.close()


def push_manifest(registry_url: str, repo: str, ref: str, raw: bytes, media_type: str) -> str:
    conn, _ = _connection(registry_url)
    try:
        conn.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", body=raw, headers={"Content-Type": media_type}
        )
        done = conn.getresponse()
        body = done.read()
        if done.status != 201:
            raise RuntimeError(f"manifest push failed: {done.status} {body[:300]!r}")
        return sha256_digest(raw)
    finally:
        conn.close()


def tar_layer(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A gzip'd tar of ``files``; returns (compressed bytes, diff_id of the tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return compressed, sha256_digest(tar_bytes)


def _descriptor(media_type: str, digest: str, size: int, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def push_image(
    registry_url: str,
    repo: str,
    tag: str,
    *,
    layers: Sequence[bytes],
    annotations: Mapping[str, str] | None = None,
) -> PushedArtifact:
    """An OCI image: each entry of ``layers`` becomes a file in its own gzip'd tar layer."""
    blobs: dict[str, int] = {}
    layer_descriptors = []
    diff_ids = []
    for index, content in enumerate(layers):
        compressed, diff_id = tar_layer({f"layer{index}.bin": content})
        digest = push_blob(registry_url, repo, compressed)
        blobs[digest] = len(compressed)
        layer_descriptors.append(_descriptor(OCI_LAYER_GZIP, digest, len(compressed)))
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/layer0.bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = push_blob(registry_url, repo, config)
    blobs[config_digest] = len(config)
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_digest, len(config)),
        "layers": layer_descriptors,
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = push_manifest(registry_url, repo, tag, raw, OCI_MANIFEST)
    return PushedArtifact(
        repository=repo,
        tag=tag,
        manifest_digest=digest,
        manifest_bytes=raw,
        media_type=OCI_MANIFEST,
        blobs=blobs,
        layer_digests=[str(d["digest"]) for d in layer_descriptors],
    )


def push_model(
    registry_url: str,
    repo: str,
    tag: str,
    *,
    files: Mapping[str, bytes | Path],
    artifact_type: str = MODEL_ARTIFACT,
    layer_media_type: str = MODEL_WEIGHT_RAW,
) -> PushedArtifact:
    """A model artifact: empty config, one raw layer per file titled with its name."""
    blobs: dict[str, int] = {}
    layer_descriptors = []
    for name, content in files.items():
        digest = push_blob(registry_url, repo, content)
        size = content.stat().st_size if isinstance(content, Path) else len(content)
        blobs[digest] = size
        layer_descriptors.append(
            _descriptor(
                layer_media_type,
                digest,
                size,
                annotations={"org.opencontainers.image.title": name},
            )
        )
    empty = b"{}"
    empty_digest = push_blob(registry_url, repo, empty)
    blobs[empty_digest] = len(empty)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": _descriptor(OCI_EMPTY, empty_digest, len(empty)),
        "layers": layer_descriptors,
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = push_manifest(registry_url, repo, tag, raw, OCI_MANIFEST)
    return PushedArtifact(
        repository=repo,
        tag=tag,
        manifest_digest=digest,
        manifest_bytes=raw,
        media_type=OCI_MANIFEST,
        blobs=blobs,
        layer_digests=[str(d["digest"]) for d in layer_descriptors],
    )


def skopeo_copy(src: str, dst: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "copy", "--quiet", *extra, src, dst],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
