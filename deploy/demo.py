"""pullgate demo: real docker-registry + real containerd, signed and unsigned content.

Run through ``bash deploy/demo.sh`` (as root, on Debian). Everything binds to loopback
and lives in a temp dir that is removed at the end. Steps:

1. start Debian's ``docker-registry`` (the upstream) and a private ``containerd``;
2. push a signed and an unsigned image, and a signed and an unsigned model artifact
   (cosign signatures made with a key generated now), plus, if ``../shared/vectors``
   is present, the real Notation-signed alpine image;
3. write a node policy and start ``pullgate serve --policy``;
4. write containerd's hosts.toml with ``pullgate install-hosts`` (pullgate is the
   server, no fallback);
5. pull each one with ``ctr`` and print what was allowed and what was refused, with
   pullgate's reason, and what the upstream registry saw.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.oci.digest import Digest  # noqa: E402
from tests.support import cosign_sign, notation_sign  # noqa: E402
from tests.support.ocilayout import deterministic_bytes, push_image, push_model  # noqa: E402
from tests.support.peers import Containerd, Pullgate, Registry  # noqa: E402

REGISTRY = "registry.example.test"
VECTORS = ROOT.parent / "shared" / "vectors"
NOTATION = VECTORS / "notation-go"

POLICY = """\
# Node policy for the demo. Paths are relative to this file.
default: deny
scopes:
  - match: "registry.example.test/models/**"
    artifactTypes: ["application/vnd.cncf.model.manifest.v1+json"]
    mode: enforce
    require:
      anyOf:
        - cosign: {key: keys/release.pub}
  - match: "registry.example.test/**"
    mode: enforce
    require:
      allOf:
        - cosign: {key: keys/release.pub}
"""


NOTATION_SCOPE = """\
  - match: "registry.example.test/notation/**"
    mode: enforce
    require:
      allOf:
        - notation: {trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}
"""


@dataclass
class Case:
    label: str
    repository: str
    tag: str
    kind: str  # "image" | "model"
    digest: str = ""
    blobs: tuple[str, ...] = ()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


def sign(registry_url: str, case: Case, key: cosign_sign.TestKey) -> None:
    digest = Digest.parse(case.digest)
    payload = cosign_sign.simple_signing_payload(digest, f"{REGISTRY}/{case.repository}")
    artifact = cosign_sign.signature_image(digest, [cosign_sign.sign_layer(key, payload)])
    cosign_sign.push_to_registry(registry_url, case.repository, artifact)


def attach_referrer(
    registry_url: str, repository: str, subject: str, artifact: cosign_sign.Artifact
) -> None:
    """Push a signature referrer and the OCI fallback index (no referrers API upstream)."""
    artifact_type = json.loads(artifact.manifest).get("artifactType", "")
    cosign_sign.push_referrer(registry_url, repository, subject, artifact, artifact_type)


def push_notation_cases(registry_url: str, policy_dir: Path) -> list[Case]:
    """The real Notation-signed alpine (JWS) from the shared vectors, and the same real
    signature attached to another image (its signed target does not match)."""
    layout = NOTATION / "internal" / "testdata" / "oci-layout"
    if not layout.is_dir():
        say(f"   (skipping the Notation cases: {NOTATION} not found)")
        return []
    signed = Case("Notation-signed alpine (real JWS)", "notation/alpine", "v2", "image")
    host = registry_url.removeprefix("http://")
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}", f"docker://{host}/{signed.repository}:v2"],
        check=True,
    )  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    signed.digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / signed.digest.split(":")[1]).read_bytes())
    signed.blobs = (manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"]))
    envelope = (NOTATION / "internal" / "testdata" / "jws_signature.sig").read_bytes()
    raw = (NOTATION / "derived" / "jws-signature-manifest.json").read_bytes()
    attach_referrer(
        registry_url,
        signed.repository,
        signed.digest,
        cosign_sign.Artifact(raw, json.loads(raw)["mediaType"], (b"{}", envelope)),
    )
    # Another image carrying alpine's real signature: the signed target is not this image.
    other = Case("alpine's real signature on another image", "notation/other", "v1", "image")
    pushed = push_image(registry_url, other.repository, other.tag, layers=[b"not alpine"])
    other.digest, other.blobs = pushed.manifest_digest, tuple(pushed.blobs)
    subject = {
        "mediaType": pushed.media_type,
        "digest": other.digest,
        "size": len(pushed.manifest_bytes),
    }
    attach_referrer(
        registry_url,
        other.repository,
        other.digest,
        notation_sign.signature_artifact(envelope, "application/jose+json", subject),
    )
    store = policy_dir / "notation" / "truststore" / "x509" / "ca" / "alpine"
    store.mkdir(parents=True)
    shutil.copy(NOTATION / "derived" / "alpine-signer.crt", store / "alpine-signer.crt")
    shutil.copy(
        NOTATION / "derived" / "trustpolicy.oci-layout-alpine.json",
        policy_dir / "notation" / "trustpolicy.json",
    )
    return [signed, other]


def refusal_reason(pullgate: Pullgate, case: Case) -> str:
    """Ask pullgate directly for the manifest, to show its OCI error JSON."""
    url = f"{pullgate.url}/v2/{case.repository}/manifests/{case.tag}?ns={REGISTRY}"
    request = urllib.request.Request(
        url,
        headers={
            "Accept": ", ".join(
                [
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ]
            )
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60):
            return "(pullgate now allows it)"
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        error = (body.get("errors") or [{}])[0]
        return f"HTTP {exc.code} {error.get('code')}: {error.get('message')}"


def pull(containerd: Containerd, case: Case) -> subprocess.CompletedProcess[str]:
    reference = f"{REGISTRY}/{case.repository}:{case.tag}"
    if case.kind == "model":
        args = ["content", "fetch", "--plain-http", "--hosts-dir", str(containerd.certs_dir)]
    else:
        args = ["images", "pull", "--plain-http", "--hosts-dir", str(containerd.certs_dir)]
    return containerd.ctr(*args, reference, check=False, timeout=300)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pullgate-demo-"))
    peers: list[Registry | Pullgate | Containerd] = []
    try:
        step("1. Start the upstream registry (Debian docker-registry) and containerd")
        registry = Registry(work / "registry").start()
        peers.append(registry)
        containerd = Containerd(work / "containerd").start()
        peers.append(containerd)
        say(f"   registry   {registry.url}   (plays {REGISTRY})")
        say(f"   containerd {containerd.socket}")

        step("2. Push content: signed and unsigned, images and models")
        key = cosign_sign.generate_key()
        policy_dir = work / "policy"
        key.write_public(policy_dir / "keys" / "release.pub")
        cases = [
            Case("signed image", "demo/app", "signed", "image"),
            Case("unsigned image", "demo/app", "unsigned", "image"),
            Case("signed model", "models/llm", "signed", "model"),
            Case("unsigned model", "models/llm", "unsigned", "model"),
        ]
        for number, case in enumerate(cases):
            if case.kind == "image":
                pushed = push_image(
                    registry.url,
                    case.repository,
                    case.tag,
                    layers=[deterministic_bytes(64 * 1024, seed=100 + number)],
                )
            else:
                pushed = push_model(
                    registry.url,
                    case.repository,
                    case.tag,
                    files={
                        "config.json": json.dumps({"model": case.tag}).encode(),
                        "model.safetensors": deterministic_bytes(8 << 20, seed=200 + number),
                    },
                )
            case.digest = pushed.manifest_digest
            case.blobs = tuple(pushed.blobs)
            if case.label.startswith("signed"):
                sign(registry.url, case, key)
            say(f"   {case.label:<16} {REGISTRY}/{case.repository}:{case.tag} = {case.digest}")
        notation_cases = push_notation_cases(registry.url, policy_dir)
        for case in notation_cases:
            cases.append(case)
            say(f"   {case.label:<16} {REGISTRY}/{case.repository}:{case.tag} = {case.digest}")

        step("3. Start pullgate with the node policy")
        policy = policy_dir / "policy.yaml"
        text = POLICY
        if notation_cases:
            marker = '  - match: "registry.example.test/**"'
            text = text.replace(marker, NOTATION_SCOPE + marker)
        policy.write_text(text)
        say(textwrap.indent(text, "   | "))
        pullgate = Pullgate(
            work / "pullgate",
            upstreams={REGISTRY: registry.url},
            policy=policy,
            cache_dir=work / "cache",
        ).start()
        peers.append(pullgate)
        say(f"   pullgate {pullgate.url} (metrics: {pullgate.admin_url}/metrics)")

        step("4. Point containerd at pullgate: pullgate is the server, no fallback")
        subprocess.run(
            [
                sys.executable, "-m", "proxy", "install-hosts",
                "--certs-dir", str(containerd.certs_dir),
                "--server", pullgate.url, "--registry", REGISTRY,
            ],
            check=True,
            cwd=ROOT,
        )  # fmt: skip
        say(textwrap.indent((containerd.certs_dir / REGISTRY / "hosts.toml").read_text(), "   | "))

        step("5. Pull everything with ctr through pullgate")
        results: list[tuple[Case, bool, str]] = []
        for case in cases:
            done = pull(containerd, case)
            allowed = done.returncode == 0
            reason = "verified" if allowed else refusal_reason(pullgate, case)
            results.append((case, allowed, reason))
            verb = "ALLOWED" if allowed else "REFUSED"
            say(f"   {verb:<8} {case.label}: {REGISTRY}/{case.repository}:{case.tag}")
            if not allowed:
                say(f"            ctr: {done.stderr.strip().splitlines()[-1][:300]}")
                say(f"            pullgate: {reason}")

        step("6. What the upstream registry served (no fallback for refused content)")
        for case, _, _ in results:
            # Blobs only this case has (the empty config {} is shared by every model).
            others = {b for c in cases if c is not case for b in c.blobs}
            own = [blob for blob in case.blobs if blob not in others]
            gets = sum(registry.blob_gets(blob) for blob in own)
            say(f"   {case.label:<44} GETs of its {len(own)} own blobs upstream: {gets}")
        stored = containerd.content_digests()
        for case, _, _ in results:
            have = case.digest in stored
            say(f"   {case.label:<44} manifest in containerd: {'yes' if have else 'no'}")

        step("7. pullgate's verdict metrics")
        for name, value in sorted(pullgate.metrics().items()):
            if name.startswith(("pullgate_verdicts_total{", "pullgate_denied_total{")):
                say(f"   {name} {value:g}")

        expected = {c.label: c.label.startswith(("signed", "Notation-signed")) for c in cases}
        wrong = [c.label for c, allowed, _ in results if allowed != expected[c.label]]
        if wrong:
            say(f"\nDEMO FAILED: unexpected outcome for {', '.join(wrong)}")
            say(pullgate.log_text()[-4000:])
            return 1
        say("\nDemo done: signed content was allowed, unsigned content was refused with reasons.")
        return 0
    finally:
        for peer in reversed(peers):
            peer.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
