"""Required referrers with real peers: a model whose policy requires a signed SBOM (or a
cosign attestation of a predicate type) is refused without it, refused while it is
unsigned or signed by another key, and served once it is signed as required.

Upstream is Debian's docker-registry (no referrers API: pullgate finds referrers through
the ``sha256-<hex>`` tag fallback); the client is real containerd (``ctr content
fetch``), with pullgate as the only host, so a refusal cannot fall back to the upstream.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from tests.support import cosign_sign as cs
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_model
from tests.support.peers import ROOT, Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
SPDX = "application/spdx+json"
SPDX_PREDICATE = "https://spdx.dev/Document"
SEEDS = itertools.count(9100)

# Refusals are not cached (negativeTTL 0), so each step below is decided afresh.
POLICY = """\
default: deny
verdictCache: {positiveTTL: 300, negativeTTL: 0}
scopes:
  - match: "registry.example.test/models/**"
    require:
      allOf:
        - cosign: {key: keys/release.pub}
        - referrers:
            - artifactType: application/spdx+json
              signedBy: {cosign: {key: keys/sbom.pub}}
  - match: "registry.example.test/attested/**"
    require:
      attestation:
        predicateType: https://spdx.dev/Document
        signedBy: {cosign: {key: keys/release.pub}}
"""


@dataclass
class Node:
    registry: Registry
    containerd: Containerd
    pullgate: Pullgate
    release: cs.TestKey
    sbom_signer: cs.TestKey

    def push_model(self, repository: str) -> PushedArtifact:
        weights = deterministic_bytes(64 * 1024, seed=next(SEEDS))
        return push_model(
            self.registry.url,
            repository,
            "v1",
            files={"model.safetensors": weights, "config.json": b'{"layers": 2}'},
        )

    def sign(self, repository: str, digest: Digest, key: cs.TestKey) -> None:
        """A legacy cosign signature (tag ``sha256-<hex>.sig``) over ``digest``."""
        payload = cs.simple_signing_payload(digest, f"{REGISTRY}/{repository}")
        artifact = cs.signature_image(digest, [cs.sign_layer(key, payload)])
        cs.push_to_registry(self.registry.url, repository, artifact)

    def attach(self, pushed: PushedArtifact, referrer: cs.Artifact, artifact_type: str) -> None:
        """Push ``referrer`` and list it in the subject's referrers fallback index."""
        cs.push_referrer(
            self.registry.url, pushed.repository, pushed.manifest_digest, referrer, artifact_type
        )

    def fetch(self, pushed: PushedArtifact) -> tuple[int, str]:
        done = self.containerd.ctr(
            "content", "fetch", "--plain-http", "--hosts-dir", str(self.containerd.certs_dir),
            f"{REGISTRY}/{pushed.repository}:{pushed.tag}",
            check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def refusal(self, pushed: PushedArtifact) -> tuple[int, dict[str, Any]]:
        """What pullgate answers for the model's manifest (the reason containerd got)."""
        request = urllib.request.Request(
            f"{self.pullgate.url}/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}",
            headers={"Accept": pushed.media_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def weight_gets(self, pushed: PushedArtifact) -> int:
        return sum(self.registry.blob_gets(digest) for digest in pushed.layer_digests)


@pytest.fixture
def node(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> Iterator[Node]:
    policy_dir = tmp_path / "policy"
    release, sbom_signer = cs.generate_key(), cs.generate_key()
    release.write_public(policy_dir / "keys" / "release.pub")
    sbom_signer.write_public(policy_dir / "keys" / "sbom.pub")
    policy = policy_dir / "policy.yaml"
    policy.write_text(POLICY)
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy)
    containerd.write_hosts(REGISTRY, pullgate.url)
    yield Node(registry, containerd, pullgate, release, sbom_signer)


def subject_of(pushed: PushedArtifact) -> Descriptor:
    return Descriptor(
        media_type=pushed.media_type,
        digest=Digest.parse(pushed.manifest_digest),
        size=len(pushed.manifest_bytes),
    )


def assert_refused(node: Node, pushed: PushedArtifact, *reasons: str) -> None:
    """containerd gets nothing of the model, and pullgate's denial says why."""
    code, output = node.fetch(pushed)
    assert code != 0, f"containerd fetched a model that should be refused: {output}"
    assert "403 Forbidden" in output, output
    assert pushed.manifest_digest not in node.containerd.content_digests()
    assert node.weight_gets(pushed) == 0, "a refused model's weights left the registry"
    status, body = node.refusal(pushed)
    assert status == 403
    error = body["errors"][0]
    assert error["code"] == "DENIED"
    for reason in reasons:
        assert reason in error["message"], error["message"]


def assert_served(node: Node, pushed: PushedArtifact) -> None:
    code, output = node.fetch(pushed)
    assert code == 0, output
    stored = node.containerd.content_digests()
    assert pushed.manifest_digest in stored
    assert set(pushed.blobs) <= stored


def test_refuses_model_without_signed_sbom_and_serves_it_once_signed(node: Node) -> None:
    """The Must-show: refused without an SBOM, refused with an unsigned one and with one
    signed by another key, served with one signed by the required key."""
    pushed = node.push_model("models/llm")
    node.sign("models/llm", Digest.parse(pushed.manifest_digest), node.release)

    # 1. No SBOM referrer at all.
    assert_refused(node, pushed, f"required referrer {SPDX} is missing")

    # 2. An SBOM referrer nobody signed.
    sbom = cs.document_referrer(cs.spdx_document("llm"), subject_of(pushed), SPDX)
    node.attach(pushed, sbom, SPDX)
    assert_refused(
        node,
        pushed,
        f"required referrer {SPDX} is not signed as required (cosign key keys/sbom.pub)",
        "no signatures found",
    )

    # 3. The SBOM signed, but by a key the policy does not name.
    node.sign("models/llm", sbom.digest, cs.generate_key())
    assert_refused(
        node, pushed, f"required referrer {SPDX} is not signed as required", "does not verify"
    )

    # 4. Signed by the required key: served, weights and all.
    node.sign("models/llm", sbom.digest, node.sbom_signer)
    assert_served(node, pushed)


def test_refuses_sbom_referrer_about_another_model(node: Node) -> None:
    """A signed SBOM of another model, listed under this one, does not count."""
    pushed = node.push_model("models/spoofed")
    other = node.push_model("models/spoofed-other")
    node.sign("models/spoofed", Digest.parse(pushed.manifest_digest), node.release)
    sbom = cs.document_referrer(cs.spdx_document("other"), subject_of(other), SPDX)
    node.attach(pushed, sbom, SPDX)  # listed under ``pushed``, about ``other``
    node.sign("models/spoofed", sbom.digest, node.sbom_signer)
    assert_refused(node, pushed, "referrer is about another manifest (subject mismatch)")


def test_refuses_model_without_required_attestation_and_serves_it_with_one(node: Node) -> None:
    pushed = node.push_model("attested/llm")
    digest = Digest.parse(pushed.manifest_digest)
    # A plain signature by the right key is no attestation.
    node.sign("attested/llm", digest, node.release)
    assert_refused(node, pushed, f"required attestation {SPDX_PREDICATE} is missing or not signed")

    statement = cs.in_toto_statement(digest, SPDX_PREDICATE, name=f"{REGISTRY}/attested/llm")
    bundle = cs.dsse_bundle(node.release, statement)
    referrer = cs.bundle_referrer(bundle, subject_of(pushed), predicate_type=SPDX_PREDICATE)
    node.attach(pushed, referrer, cs.BUNDLE_TYPE)
    assert_served(node, pushed)


def test_verify_command_names_the_missing_sbom(node: Node) -> None:
    """``pullgate verify`` explains the same refusal, and allows once the SBOM is signed."""
    pushed = node.push_model("models/cli")
    node.sign("models/cli", Digest.parse(pushed.manifest_digest), node.release)
    policy = node.pullgate.policy
    assert policy is not None
    command = [
        sys.executable, "-m", "proxy", "verify", f"{REGISTRY}/models/cli:v1",
        "--policy", str(policy), "--upstream", f"{REGISTRY}={node.registry.url}",
    ]  # fmt: skip

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    refused = run()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"required referrer {SPDX} is missing" in refused.stdout

    sbom = cs.document_referrer(cs.spdx_document("cli"), subject_of(pushed), SPDX)
    node.attach(pushed, sbom, SPDX)
    node.sign("models/cli", sbom.digest, node.sbom_signer)
    allowed = run()
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"ALLOWED {REGISTRY}/models/cli@{pushed.manifest_digest}" in allowed.stdout
