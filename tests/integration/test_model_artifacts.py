"""Model artifacts signed with ``model_signing`` (EC key), three packagings, real peers.

A model directory is signed by the test with the ``model_signing`` library and packed
three ways: ModelPack with raw layers (signature as a referrer), ModelPack with
tar+gzip layers (referrer), and a ModelKit-style artifact (KitOps media types) that
ships the signature as a ``model.sig`` layer. Each is pushed to Debian's
docker-registry and fetched by real containerd (``ctr content fetch``) through
pullgate, which is containerd's only host.

Then one byte of one weight file changes and the artifact is repackaged with the
original signature: every manifest and layer digest is self-consistent, so only the
OMS check can catch it. The pull fails, and pullgate's refusal names the file.

Interop: what pullgate let through, unpacked from containerd's content store, verifies
with ``model_signing verify`` (the CLI the Sigstore Model Validation Operator runs).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.oci import mediatypes as mt
from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from tests.support import cosign_sign as cs
from tests.support.ocilayout import deterministic_bytes
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
TAMPERED_FILE = "weights/model-00001.safetensors"
MODELPACK_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MODELPACK_WEIGHT_TGZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
MODELPACK_CONFIG_TGZ = "application/vnd.cncf.model.weight.config.v1.tar+gzip"
MODELPACK_WEIGHT_ZST = "application/vnd.cncf.model.weight.v1.tar+zstd"
MODELKIT_MODEL_TGZ = "application/vnd.kitops.modelkit.model.v1.tar+gzip"
MODELKIT_DOCS_TAR = "application/vnd.kitops.modelkit.docs.v1.tar"


def model_files(seed: int) -> dict[str, bytes]:
    return {
        TAMPERED_FILE: deterministic_bytes(3 * 1024 * 1024 + 123, seed=seed),
        "weights/model-00002.safetensors": deterministic_bytes(1024 * 1024, seed=seed + 1),
        "config.json": json.dumps({"architecture": "tiny", "seed": seed}).encode(),
        "tokenizer.json": b'{"vocab": ["a", "b"]}',
    }


def write_model(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def sign_model(directory: Path, private_key: Path, signature: Path) -> bytes:
    """Sign ``directory`` with model_signing (files serialization, EC key)."""
    import model_signing

    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=str(private_key)
    ).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])
    ).sign(directory, signature)
    return signature.read_bytes()


def tar_of(files: dict[str, bytes], *, gz: bool, zstd: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = out.getvalue()
    if zstd:
        import zstandard

        return zstandard.ZstdCompressor().compress(raw)
    return gzip.compress(raw, mtime=0) if gz else raw


def descriptor(media_type: str, data: bytes, **annotations: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mediaType": media_type,
        "digest": str(Digest.of(data)),
        "size": len(data),
    }
    if annotations:
        out["annotations"] = annotations
    return out


def manifest_artifact(
    tag: str,
    *,
    artifact_type: str,
    config: tuple[str, bytes],
    layers: list[tuple[dict[str, Any], bytes]],
) -> cs.Artifact:
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(config[0], config[1]),
        "layers": [d for d, _ in layers],
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return cs.Artifact(raw, mt.OCI_MANIFEST, (config[1], *(b for _, b in layers)), tag)


FILEPATH = mt.MODEL_FILEPATH
TITLE = mt.TITLE


def modelpack_raw(tag: str, files: dict[str, bytes]) -> cs.Artifact:
    config = json.dumps({"descriptor": {"name": "tiny"}, "modelfs": {"type": "layers"}}).encode()
    layers = [
        (descriptor(MODELPACK_WEIGHT_RAW, data, **{FILEPATH: name, TITLE: name}), data)
        for name, data in sorted(files.items())
    ]
    return manifest_artifact(
        tag,
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=(mt.MODELPACK_CONFIG, config),
        layers=layers,
    )


def modelpack_targz(tag: str, files: dict[str, bytes]) -> cs.Artifact:
    """One tar+gzip layer per weight file, one for the weights' config files."""
    config = json.dumps({"descriptor": {"name": "tiny"}, "modelfs": {"type": "layers"}}).encode()
    layers = []
    for name in sorted(n for n in files if n.startswith("weights/")):
        blob = tar_of({name: files[name]}, gz=True)
        layers.append((descriptor(MODELPACK_WEIGHT_TGZ, blob, **{FILEPATH: name}), blob))
    for name in ("config.json", "tokenizer.json"):
        blob = tar_of({name: files[name]}, gz=True)
        layers.append((descriptor(MODELPACK_CONFIG_TGZ, blob, **{FILEPATH: name}), blob))
    return manifest_artifact(
        tag,
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=(mt.MODELPACK_CONFIG, config),
        layers=layers,
    )


def modelpack_tarzstd(tag: str, files: dict[str, bytes]) -> cs.Artifact:
    """The weights directory as one tar+zstd layer, each other file raw."""
    config = json.dumps({"descriptor": {"name": "tiny"}, "modelfs": {"type": "layers"}}).encode()
    weights = tar_of(
        {n: d for n, d in files.items() if n.startswith("weights/")}, gz=False, zstd=True
    )
    layers = [(descriptor(MODELPACK_WEIGHT_ZST, weights, **{FILEPATH: "weights"}), weights)]
    layers += [
        (descriptor(MODELPACK_WEIGHT_RAW, files[name], **{FILEPATH: name}), files[name])
        for name in ("config.json", "tokenizer.json")
    ]
    return manifest_artifact(
        tag,
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=(mt.MODELPACK_CONFIG, config),
        layers=layers,
    )


def modelkit(tag: str, files: dict[str, bytes], signature: bytes) -> cs.Artifact:
    """KitOps media types: the weights directory as one tar+gzip layer, the rest as a
    plain tar layer without a path, and the signature as a ``model.sig`` layer."""
    kitfile = json.dumps({"manifestVersion": "1.0", "package": {"name": "tiny"}}).encode()
    weights = tar_of({n: d for n, d in files.items() if n.startswith("weights/")}, gz=True)
    docs = tar_of({n: d for n, d in files.items() if "/" not in n}, gz=False)
    layers = [
        (descriptor(MODELKIT_MODEL_TGZ, weights, **{FILEPATH: "weights"}), weights),
        (descriptor(MODELKIT_DOCS_TAR, docs), docs),
        (descriptor(mt.SIGSTORE_BUNDLE_V03, signature, **{TITLE: "model.sig"}), signature),
    ]
    return manifest_artifact(
        tag, artifact_type=mt.MODELKIT_CONFIG, config=(mt.MODELKIT_CONFIG, kitfile), layers=layers
    )


@dataclass
class Node:
    registry: Registry
    containerd: Containerd
    pullgate: Pullgate
    public_key: Path
    private_key: Path
    work: Path

    def push(self, repository: str, artifact: cs.Artifact, signature: bytes | None) -> Digest:
        digest = cs.push_to_registry(self.registry.url, repository, artifact)
        if signature is not None:
            subject = Descriptor(mt.OCI_MANIFEST, digest, len(artifact.manifest))
            referrer = cs.bundle_referrer(signature, subject)
            cs.push_referrer(self.registry.url, repository, digest, referrer, cs.BUNDLE_TYPE)
        return digest

    def fetch(self, repository: str, tag: str) -> tuple[int, str]:
        done = self.containerd.ctr(
            "content", "fetch", "--plain-http", "--hosts-dir", str(self.containerd.certs_dir),
            f"{REGISTRY}/{repository}:{tag}",
            check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def content(self, digest: str) -> bytes:
        done = subprocess.run(
            ["ctr", "--address", self.containerd.socket, "-n", "test", "content", "get", digest],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return done.stdout

    def get(self, path: str) -> tuple[int, Any]:
        return self.get_from(self.pullgate, path)

    @staticmethod
    def get_from(pullgate: Pullgate, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{pullgate.url}{path}", timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def node(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> Iterator[Node]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    policy_dir = tmp_path / "policy"
    (policy_dir / "keys").mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private_key = tmp_path / "model-key.pem"
    private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_key = policy_dir / "keys" / "model.pub"
    public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    policy = policy_dir / "policy.yaml"
    policy.write_text(
        "default: deny\n"
        "scopes:\n"
        '  - match: "registry.example.test/models/**"\n'
        "    mode: enforce\n"
        "    require:\n"
        "      allOf:\n"
        "        - modelSigning: {key: keys/model.pub}\n"
    )
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, policy=policy, cache_dir=tmp_path / "cache"
    )
    containerd.write_hosts(REGISTRY, pullgate.url)
    yield Node(registry, containerd, pullgate, public_key, private_key, tmp_path)


def unpack(node: Node, manifest_digest: Digest, target: Path) -> Path:
    """Rebuild the model directory from what containerd fetched through pullgate."""
    manifest = json.loads(node.content(str(manifest_digest)))
    target.mkdir(parents=True)
    for layer in manifest["layers"]:
        annotations = layer.get("annotations", {})
        if annotations.get(TITLE) == "model.sig":
            continue
        blob = node.content(layer["digest"])
        assert Digest.of(blob) == Digest.parse(layer["digest"])
        if mt.layer_packing(layer["mediaType"]) == "raw":
            path = target / annotations[FILEPATH]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        else:
            if mt.layer_packing(layer["mediaType"]) == "zstd":
                import zstandard

                blob = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
                tar.extractall(target, filter="data")
    return target


def model_signing_verify(
    node: Node, directory: Path, signature: Path
) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "model_signing"
    return subprocess.run(
        [str(cli), "verify", "key", str(directory), "--signature", str(signature),
         "--public_key", str(node.public_key)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def tampered(files: dict[str, bytes]) -> dict[str, bytes]:
    changed = bytearray(files[TAMPERED_FILE])
    changed[len(changed) // 2] ^= 0x01
    return {**files, TAMPERED_FILE: bytes(changed)}


PACKAGINGS = ["modelpack-raw", "modelpack-targz", "modelkit-modelsig", "modelpack-tarzstd"]


def package(
    kind: str, tag: str, files: dict[str, bytes], signature: bytes
) -> tuple[cs.Artifact, bytes | None]:
    """The artifact, and the signature to attach as a referrer (None: it is inside)."""
    if kind == "modelpack-raw":
        return modelpack_raw(tag, files), signature
    if kind == "modelpack-targz":
        return modelpack_targz(tag, files), signature
    if kind == "modelpack-tarzstd":
        return modelpack_tarzstd(tag, files), signature
    return modelkit(tag, files, signature), None


@pytest.mark.parametrize("kind", PACKAGINGS)
def test_signed_model_pulls_and_tampered_repackage_is_refused_naming_the_file(
    node: Node, kind: str
) -> None:
    seed = 9100 + PACKAGINGS.index(kind) * 10
    files = model_files(seed)
    signature_path = node.work / "model.sig"
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, signature_path
    )
    repository = f"models/{kind}"

    # 1. Untouched: containerd fetches it through pullgate.
    artifact, referrer_signature = package(kind, "v1", files, signature)
    digest = node.push(repository, artifact, referrer_signature)
    code, output = node.fetch(repository, "v1")
    assert code == 0, f"ctr content fetch of the signed {kind} model failed: {output}"
    fetched = node.containerd.content_digests()
    manifest = json.loads(artifact.manifest)
    assert {layer["digest"] for layer in manifest["layers"]} <= fetched

    # 2. Interop: what pullgate let through verifies with model_signing's own CLI.
    unpacked = unpack(node, digest, node.work / "unpacked")
    verified = model_signing_verify(node, unpacked, signature_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # 3. One byte of one weight file changes; repackaged with the original signature.
    bad_files = tampered(files)
    bad, bad_referrer = package(kind, "v2", bad_files, signature)
    bad_digest = node.push(repository, bad, bad_referrer)
    assert bad_digest != digest
    bad_manifest = json.loads(bad.manifest)
    for layer, blob in zip(bad_manifest["layers"], bad.blobs[1:], strict=True):
        assert Digest.of(blob) == Digest.parse(layer["digest"])  # self-consistent
    code, output = node.fetch(repository, "v2")
    assert code != 0, f"containerd fetched a tampered {kind} model: {output}"

    # 4. The refusal names the file: in the manifest verdict (raw layers are checked
    #    from the manifest) or, for tar layers, on the layer itself.
    changed = [
        layer for layer in bad_manifest["layers"]
        if layer["digest"] not in {x["digest"] for x in manifest["layers"]}
    ]  # fmt: skip
    assert len(changed) == 1
    status, body = node.get(f"/v2/{repository}/manifests/v2?ns={REGISTRY}")
    if kind == "modelpack-raw":
        assert status == 403
        assert TAMPERED_FILE in body["errors"][0]["message"]
    else:
        assert status == 200, body
        status, body = node.get(f"/v2/{repository}/blobs/{changed[0]['digest']}?ns={REGISTRY}")
        assert status == 403, "a layer whose file check failed must be refused on retry"
        message = body["errors"][0]["message"]
        assert TAMPERED_FILE in message and "signed sha256:" in message
        # No client got the whole wrong layer, and the cache holds none of it.
        assert changed[0]["digest"] not in node.containerd.content_digests()
        cached = node.work / "cache" / "blobs" / "sha256" / Digest.parse(changed[0]["digest"]).hex
        assert not cached.exists()
        assert TAMPERED_FILE in node.pullgate.log_text()


def test_warm_hit_of_checked_layer_is_not_parsed_again(node: Node) -> None:
    files = model_files(9300)
    signature_path = node.work / "model.sig"
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, signature_path
    )
    artifact = modelpack_targz("v1", files)
    node.push("models/warm", artifact, signature)
    code, output = node.fetch("models/warm", "v1")
    assert code == 0, output
    checks = node.work / "cache" / "filechecks"
    layers = json.loads(artifact.manifest)["layers"]
    for layer in layers:
        hex_digest = Digest.parse(layer["digest"]).hex
        assert list((checks / hex_digest).glob("*.plan.json")), "the plan was not recorded"
        assert list(checks.glob(f"{hex_digest}.*.passed")), "the pass was not recorded"
    # A second client (a fresh containerd would do; a plain GET is enough) gets the
    # cached layer; the upstream is not asked again and the plan's pass still holds.
    before = sum(node.registry.blob_gets(layer["digest"]) for layer in layers)
    for layer in layers:
        status, body = node.get(f"/v2/models/warm/blobs/{layer['digest']}?ns={REGISTRY}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer["digest"][7:]
    assert sum(node.registry.blob_gets(layer["digest"]) for layer in layers) == before
    assert "checking cached layer" not in node.pullgate.log_text()
    counted = node.pullgate.metrics()
    assert counted['pullgate_layer_file_checks_total{result="passed"}'] == len(layers)
    assert counted['pullgate_layer_file_checks_total{result="skipped"}'] == len(layers)
    # Without the recorded pass (a layer cached before a signature named its files),
    # the cached copy is checked once from disk, then served.
    for passed in checks.glob("*.passed"):
        passed.unlink()
    node.pullgate.restart()
    status, body = node.get(f"/v2/models/warm/manifests/v1?ns={REGISTRY}")
    assert status == 200
    status, body = node.get(f"/v2/models/warm/blobs/{layers[0]['digest']}?ns={REGISTRY}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == layers[0]["digest"][7:]
    assert f"checking stored layer {layers[0]['digest']}" in node.pullgate.log_text()
    assert list(checks.glob(f"{Digest.parse(layers[0]['digest']).hex}.*.passed"))


# ---- hostile archives through the real stack -------------------------------------------


def _member(
    name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, target: str = ""
) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    padding = -len(data) % tarfile.BLOCKSIZE if kind == tarfile.REGTYPE else 0
    return info.tobuf(tarfile.PAX_FORMAT) + (
        data + bytes(padding) if kind == tarfile.REGTYPE else b""
    )


def _hostile_layer(case: str, files: dict[str, bytes]) -> bytes:
    """A tar+gzip layer holding the signed files, made hostile one way."""
    end = bytes(2 * tarfile.BLOCKSIZE)
    honest = b"".join(_member(name, data) for name, data in sorted(files.items()))
    if case == "dotdot":
        raw = honest + _member("weights/../../etc/cron.d/evil", b"* * * * * root sh") + end
    elif case == "absolute":
        raw = _member("/etc/passwd", b"root::0:0") + honest + end
    elif case == "symlink":
        rest = {n: d for n, d in files.items() if n != "config.json"}
        raw = b"".join(_member(n, d) for n, d in sorted(rest.items()))
        raw += _member("config.json", kind=tarfile.SYMTYPE, target="/etc/shadow") + end
    elif case == "extra":
        raw = honest + _member("weights/backdoor.py", b"import os") + end
    elif case == "missing":
        raw = b"".join(_member(n, d) for n, d in sorted(files.items()) if n != "config.json") + end
    else:  # gzip bomb: a signed file name, 1 GiB of zeros, compressed to about 1 MiB
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        info = tarfile.TarInfo(TAMPERED_FILE)
        info.size = 1 << 30
        parts = [compressor.compress(info.tobuf(tarfile.PAX_FORMAT))]
        zeros = bytes(1 << 20)
        parts += [compressor.compress(zeros) for _ in range(1024)]
        parts.append(compressor.flush())
        return b"".join(parts)
    return gzip.compress(raw, mtime=0)


HOSTILE = {
    "dotdot": "escapes the model with ..",
    "absolute": "absolute path",
    "symlink": "does not allow symlinks",
    "extra": "weights/backdoor.py is not covered by the signature",
    "missing": "signed file config.json is missing",
    "gzip-bomb": "decompression bomb",
}


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_refuses_hostile_tar_layer_with_reason_and_bounded_rss(node: Node, case: str) -> None:
    files = model_files(9500 + list(HOSTILE).index(case))
    signature_path = node.work / "model.sig"
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, signature_path
    )
    blob = _hostile_layer(case, files)
    config = json.dumps({"descriptor": {"name": "hostile"}}).encode()
    artifact = manifest_artifact(
        "v1",
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=(mt.MODELPACK_CONFIG, config),
        layers=[(descriptor(MODELPACK_WEIGHT_TGZ, blob), blob)],
    )
    repository = f"models/hostile-{case}"
    node.push(repository, artifact, signature)
    before = _peak_rss_kib(node.pullgate.pid)
    code, output = node.fetch(repository, "v1")
    assert code != 0, f"containerd fetched a hostile layer ({case}): {output}"
    layer_digest = str(Digest.of(blob))
    assert layer_digest not in node.containerd.content_digests()
    status, body = node.get(f"/v2/{repository}/blobs/{layer_digest}?ns={REGISTRY}")
    assert status == 403
    assert HOSTILE[case] in body["errors"][0]["message"], body
    grown_mib = (_peak_rss_kib(node.pullgate.pid) - before) / 1024
    assert grown_mib < 64, f"pullgate's peak RSS grew {grown_mib:.0f} MiB on a {case} layer"


def test_refuses_symlink_layer_under_an_ignore_rule(node: Node) -> None:
    """model_signing ignores .git by default, so layers under it carry no signed file.
    A symlink there (.git -> weights) would let a later ignored layer (a raw layer
    titled .git/<weight>) be unpacked over a signed weight file."""
    files = model_files(9700)
    signature_path = node.work / "model.sig"
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, signature_path
    )
    statement = json.loads(base64.b64decode(json.loads(signature)["dsseEnvelope"]["payload"]))
    assert ".git" in statement["predicate"]["serialization"]["ignore_paths"]
    honest = modelpack_targz("v1", files)
    link = gzip.compress(
        _member(".git", kind=tarfile.SYMTYPE, target="weights") + bytes(2 * tarfile.BLOCKSIZE),
        mtime=0,
    )
    evil = b"unsigned weights"
    layers = list(zip(json.loads(honest.manifest)["layers"], honest.blobs[1:], strict=True))
    layers.append((descriptor(MODELPACK_WEIGHT_TGZ, link, **{FILEPATH: ".git"}), link))
    overwrite = f".git/{TAMPERED_FILE.split('/', 1)[1]}"
    layers.append((descriptor(MODELPACK_WEIGHT_RAW, evil, **{FILEPATH: overwrite}), evil))
    config = honest.blobs[0]
    artifact = manifest_artifact(
        "v1",
        artifact_type=mt.MODELPACK_ARTIFACT,
        config=(mt.MODELPACK_CONFIG, config),
        layers=layers,
    )
    node.push("models/ignored-link", artifact, signature)
    code, output = node.fetch("models/ignored-link", "v1")
    assert code != 0, f"containerd fetched a symlink under an ignore rule: {output}"
    link_digest = str(Digest.of(link))
    assert link_digest not in node.containerd.content_digests()
    status, body = node.get(f"/v2/models/ignored-link/blobs/{link_digest}?ns={REGISTRY}")
    assert status == 403
    assert "symlink under an ignore rule" in body["errors"][0]["message"], body


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_every_worker_enforces_the_per_file_plan(
    tmp_path: Path,
    registry: Registry,
    node: Node,
    make_pullgate: Callable[..., Pullgate],
    cached: bool,
) -> None:
    """Two worker processes: a blob request may reach the one that did not verify the
    manifest. It finds the plan on disk (with the cache, or without one where the
    workers meet, in the supervisor's runtime directory) and refuses all the same."""
    from tests.support.pulls import fetch

    cache = tmp_path / "cache2" if cached else None
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url},
        policy=node.pullgate.policy,
        cache_dir=cache,
        workers=2,
    )
    files = model_files(9700 if cached else 9800)
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, node.work / "model.sig"
    )
    bad = modelpack_targz("v2", tampered(files))
    node.push("models/workers", bad, signature)
    manifest = json.loads(bad.manifest)
    layer = next(x for x in manifest["layers"] if x["annotations"][FILEPATH] == TAMPERED_FILE)
    status, _, _ = fetch(pullgate, f"/v2/models/workers/manifests/v2?ns={REGISTRY}")
    assert status == 200
    for _ in range(6):  # new connections: the kernel spreads them over both workers
        status, digest, received = fetch(
            pullgate, f"/v2/models/workers/blobs/{layer['digest']}?ns={REGISTRY}"
        )
        assert status in (0, 200, 403)  # cut before the held-back tail, then refused
        assert digest != layer["digest"] and received < layer["size"], "a complete tampered layer"
    if cache is not None:
        assert not (cache / "blobs" / "sha256" / layer["digest"][7:]).exists()


def test_refuses_a_tampered_layer_that_another_signers_model_vouches_for(
    tmp_path: Path, registry: Registry, node: Node, make_pullgate: Callable[..., Pullgate]
) -> None:
    """Two scopes, two signers. The victim's model is repackaged with a tampered layer
    and its original signature; another signer (trusted only for other/**) signs a
    model of its own with that very layer. Its plan must not stand in for the
    victim's (the layer must hold what the signatures of its repository say), nor
    block the other model, whose own signature it does match."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other_key = ec.generate_private_key(ec.SECP256R1())
    other_private = tmp_path / "other-key.pem"
    other_private.write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert node.pullgate.policy is not None
    policy_dir = node.pullgate.policy.parent
    (policy_dir / "keys" / "other.pub").write_bytes(
        other_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    policy = policy_dir / "two-signers.yaml"
    policy.write_text(
        node.pullgate.policy.read_text() + '  - match: "registry.example.test/other/**"\n'
        "    require: {modelSigning: {key: keys/other.pub}}\n"
    )
    pullgate = make_pullgate(
        upstreams={REGISTRY: registry.url}, policy=policy, cache_dir=tmp_path / "cache3"
    )
    node.containerd.write_hosts(REGISTRY, pullgate.url)
    files = model_files(9900)
    victim_signature = sign_model(
        write_model(tmp_path / "victim", files), node.private_key, tmp_path / "victim.sig"
    )
    bad_files = tampered(files)
    other_signature = sign_model(
        write_model(tmp_path / "other", bad_files), other_private, tmp_path / "other.sig"
    )
    victim, other = modelpack_targz("v2", bad_files), modelpack_targz("v1", bad_files)
    node.push("models/victim", victim, victim_signature)
    node.push("other/evil", other, other_signature)
    layer = next(
        x for x in json.loads(victim.manifest)["layers"]
        if x["annotations"][FILEPATH] == TAMPERED_FILE
    )  # fmt: skip
    assert layer in json.loads(other.manifest)["layers"], "the two models share the layer"
    # 1. The victim's manifest is verified (its plan recorded), then the other
    #    signer's model is pulled whole: the shared layer passes that signer's plan.
    status, _ = node.get_from(pullgate, f"/v2/models/victim/manifests/v2?ns={REGISTRY}")
    assert status == 200
    code, output = node.fetch("other/evil", "v1")
    assert code == 0, output
    # 2. The victim's pull of that layer is refused, naming the file: the layer does
    #    not hold what the victim's signature says, whoever else vouches for it.
    status, body = node.get_from(
        pullgate, f"/v2/models/victim/blobs/{layer['digest']}?ns={REGISTRY}"
    )
    assert status == 403, body
    message = body["errors"][0]["message"]
    assert TAMPERED_FILE in message and "signed sha256:" in message
    # (This containerd already holds the layer, content-addressed, from the other
    # model's pull; a node without it gets the refusal above.)


# ---- what a model-only signature does not cover -----------------------------------------

OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def modelcar(tag: str, files: dict[str, bytes], config_type: str = OCI_IMAGE_CONFIG) -> cs.Artifact:
    """The signed files as an ordinary, unpackable image (a KServe ModelCar-like
    packing): one image tar+gzip layer per file, each with its filepath, and an image
    config that names a process to run (typed ``config_type``)."""
    import platform

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    layers = []
    for name in sorted(files):
        blob = tar_of({name: files[name]}, gz=True)
        layers.append((descriptor(OCI_LAYER_TGZ, blob, **{FILEPATH: name}), blob))
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Entrypoint": ["/bin/sh", "-c", "echo not a model"], "User": "0"},
            "rootfs": {
                "type": "layers",
                "diff_ids": [str(Digest.of(gzip.decompress(b))) for _, b in layers],
            },
        }
    ).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [d for d, _ in layers],
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return cs.Artifact(raw, mt.OCI_MANIFEST, (config, *(b for _, b in layers)), tag)


def pull_image(node: Node, repository: str, tag: str) -> tuple[int, str]:
    done = node.containerd.ctr(
        "images", "pull", "--plain-http", "--hosts-dir", str(node.containerd.certs_dir),
        f"{REGISTRY}/{repository}:{tag}",
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_refuses_model_signature_authorising_an_image_config(
    tmp_path: Path, registry: Registry, node: Node, make_pullgate: Callable[..., Pullgate]
) -> None:
    """The model's files, signed by model_signing, replayed into an image whose config
    runs a process: a model signature covers the files only, so on its own it does not
    authorise the config. With allowImageConfig inside an allOf that also requires a
    cosign signature of the manifest (the README's recipe), containerd unpacks it."""
    files = model_files(9950)
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, node.work / "model.sig"
    )
    # Control: the same signature over the same files, packed as ModelPack, is served.
    node.push("models/plain", modelpack_targz("v1", files), signature)
    code, output = node.fetch("models/plain", "v1")
    assert code == 0, output

    image = modelcar("v1", files)
    digest = node.push("models/modelcar", image, signature)
    code, output = pull_image(node, "models/modelcar", "v1")
    assert code != 0, f"containerd pulled an image authorised by a model signature: {output}"
    status, body = node.get(f"/v2/models/modelcar/manifests/v1?ns={REGISTRY}")
    assert status == 403, body
    message = body["errors"][0]["message"]
    assert f"the config is {OCI_IMAGE_CONFIG}, a runnable image config" in message, message
    config_digest = json.loads(image.manifest)["config"]["digest"]
    status, body = node.get(f"/v2/models/modelcar/blobs/{config_digest}?ns={REGISTRY}")
    assert status == 403, "the runnable config must not be served"
    # The same config typed as a ModelPack config (containerd unpacks and its CRI
    # decodes it all the same) is read and refused too.
    node.push("models/disguised", modelcar("v1", files, mt.MODELPACK_CONFIG), signature)
    code, output = pull_image(node, "models/disguised", "v1")
    assert code != 0, f"containerd pulled a disguised image config: {output}"
    status, body = node.get(f"/v2/models/disguised/manifests/v1?ns={REGISTRY}")
    assert status == 403, body
    message = body["errors"][0]["message"]
    assert f"the {mt.MODELPACK_CONFIG} config sets Entrypoint, User" in message, message

    # The opt-in: a cosign signature of the manifest covers the config.
    release = cs.generate_key()
    assert node.pullgate.policy is not None
    policy_dir = node.pullgate.policy.parent
    release.write_public(policy_dir / "keys" / "release.pub")
    policy = policy_dir / "modelcar.yaml"
    policy.write_text(
        "default: deny\n"
        "verdictCache: {negativeTTL: 0}\n"  # the refusal below is not kept
        "scopes:\n"
        '  - match: "registry.example.test/models/**"\n'
        "    require:\n"
        "      allOf:\n"
        "        - cosign: {key: keys/release.pub}\n"
        "        - modelSigning: {key: keys/model.pub, allowImageConfig: true}\n"
    )
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy)
    node.containerd.write_hosts(REGISTRY, pullgate.url)
    status, body = node.get_from(pullgate, f"/v2/models/modelcar/manifests/v1?ns={REGISTRY}")
    assert status == 403 and "no cosign signature" in body["errors"][0]["message"], body
    payload = cs.simple_signing_payload(digest, f"{REGISTRY}/models/modelcar")
    signed = cs.signature_image(digest, [cs.sign_layer(release, payload)])
    cs.push_to_registry(registry.url, "models/modelcar", signed)
    code, output = pull_image(node, "models/modelcar", "v1")
    assert code == 0, f"the cosign-signed ModelCar did not pull: {output}"
    # Still checked per file: the tampered files under the same two signatures are not.
    bad = modelcar("v2", tampered(files))
    bad_digest = node.push("models/modelcar", bad, signature)
    payload = cs.simple_signing_payload(bad_digest, f"{REGISTRY}/models/modelcar")
    cs.push_to_registry(
        registry.url,
        "models/modelcar",
        cs.signature_image(bad_digest, [cs.sign_layer(release, payload)]),
    )
    code, output = pull_image(node, "models/modelcar", "v2")
    assert code != 0, f"containerd pulled a tampered ModelCar: {output}"


@pytest.mark.parametrize("packing", ["raw", "tar"])
def test_refuses_layer_not_in_the_signed_file_list(node: Node, packing: str) -> None:
    """A signed model plus one layer the signature does not list (a script, raw or as
    a tar layer with a path of its own): the manifest is refused before any layer moves."""
    files = model_files(9960 + len(packing))
    signature = sign_model(
        write_model(node.work / "model", files), node.private_key, node.work / "model.sig"
    )
    script = b"import os\nos.system('id')\n"
    honest = modelpack_raw("v1", files)
    doc = json.loads(honest.manifest)
    if packing == "raw":
        extra = script
        doc["layers"].append(descriptor(MODELPACK_WEIGHT_RAW, extra, **{FILEPATH: "load.py"}))
        reason = "file load.py is not covered by the signature"
    else:
        extra = tar_of({"extras/load.py": script}, gz=True)
        doc["layers"].append(descriptor(MODELPACK_WEIGHT_TGZ, extra, **{FILEPATH: "extras"}))
        reason = f"layer {Digest.of(extra)} (extras) holds no signed file"
    raw = json.dumps(doc, separators=(",", ":")).encode()
    artifact = cs.Artifact(raw, mt.OCI_MANIFEST, (*honest.blobs, extra), "v1")
    repository = f"models/extra-{packing}"
    node.push(repository, artifact, signature)
    code, output = node.fetch(repository, "v1")
    assert code != 0, f"containerd fetched a model with an unsigned {packing} layer: {output}"
    status, body = node.get(f"/v2/{repository}/manifests/v1?ns={REGISTRY}")
    assert status == 403 and reason in body["errors"][0]["message"], body
    status, _ = node.get(f"/v2/{repository}/blobs/{Digest.of(extra)}?ns={REGISTRY}")
    assert status == 403
    assert str(Digest.of(extra)) not in node.containerd.content_digests()
