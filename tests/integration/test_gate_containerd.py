"""The signature gate with real containerd: signed pulls work, every bad signature is final.

containerd's hosts.toml makes pullgate the server, so a refusal cannot fall back to the
upstream. Each refusal case asserts that the upstream registry's access log shows no
GET of that image's blobs: nothing gated left the registry for containerd.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.oci.digest import Digest
from tests.support import cosign_sign as cs
from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_image
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration

REGISTRY = "registry.example.test"
SEEDS = itertools.count(7000)


@dataclass
class Node:
    registry: Registry
    containerd: Containerd
    pullgate: Pullgate
    key: cs.TestKey
    sigstore: cs.TestSigstore
    policy: Path
    work: Path

    def push(self, repository: str, tag: str) -> PushedArtifact:
        layers = [deterministic_bytes(32 * 1024, seed=next(SEEDS)) for _ in range(2)]
        return push_image(self.registry.url, repository, tag, layers=layers)

    def sign(
        self, repository: str, digest: str, *, key: cs.TestKey | None = None, signed: str = ""
    ) -> None:
        """Attach a legacy cosign signature to ``digest`` over ``signed`` (default: it)."""
        payload = cs.simple_signing_payload(
            Digest.parse(signed or digest), f"{REGISTRY}/{repository}"
        )
        layer = cs.sign_layer(key or self.key, payload)
        self.attach(repository, digest, layer)

    def attach(self, repository: str, digest: str, layer: cs.SignatureLayer) -> None:
        artifact = cs.signature_image(Digest.parse(digest), [layer])
        cs.push_to_registry(self.registry.url, repository, artifact)

    def pull(self, repository: str, tag: str) -> tuple[int, str]:
        done = self.containerd.ctr(
            "images", "pull", "--plain-http", "--hosts-dir", str(self.containerd.certs_dir),
            f"{REGISTRY}/{repository}:{tag}",
            check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def image_blob_gets(self, pushed: PushedArtifact) -> int:
        return sum(self.registry.blob_gets(blob) for blob in pushed.blobs)

    def get(self, path: str) -> tuple[int, dict[str, Any] | bytes]:
        request = urllib.request.Request(
            f"{self.pullgate.url}{path}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def write_policy(path: Path, *, extra_scopes: str = "") -> None:
    path.write_text(
        "default: deny\n"
        "trust:\n"
        "  sigstoreTrustedRoot: trust/trusted_root.json\n"
        "scopes:\n"
        f"{extra_scopes}"
        '  - match: "registry.example.test/keyless/**"\n'
        "    mode: enforce\n"
        "    require:\n"
        "      anyOf:\n"
        "        - cosign: {keyless: {issuer: 'https://issuer.example.test',"
        " subject: 'signer@example.test'}, tlog: required}\n"
        '  - match: "registry.example.test/**"\n'
        "    mode: enforce\n"
        "    require:\n"
        "      allOf:\n"
        "        - cosign: {key: keys/release.pub}\n"
    )


@pytest.fixture
def node(
    tmp_path: Path,
    registry: Registry,
    containerd: Containerd,
    make_pullgate: Callable[..., Pullgate],
) -> Iterator[Node]:
    policy_dir = tmp_path / "policy"
    key = cs.generate_key()
    key.write_public(policy_dir / "keys" / "release.pub")
    sigstore = cs.TestSigstore()
    sigstore.write_trusted_root(policy_dir / "trust" / "trusted_root.json")
    policy = policy_dir / "policy.yaml"
    write_policy(policy)
    pullgate = make_pullgate(upstreams={REGISTRY: registry.url}, policy=policy)
    containerd.write_hosts(REGISTRY, pullgate.url)
    yield Node(registry, containerd, pullgate, key, sigstore, policy, tmp_path)


def assert_refused_without_blob_gets(node: Node, pushed: PushedArtifact, why: str) -> None:
    code, output = node.pull(pushed.repository, pushed.tag)
    assert code != 0, f"containerd pulled an image that should be refused ({why}): {output}"
    assert pushed.manifest_digest not in node.containerd.content_digests()
    assert node.image_blob_gets(pushed) == 0, "a refused image's blobs left the registry"


def test_signed_image_pulls_with_upstream_digests(node: Node) -> None:
    pushed = node.push("app/signed", "v1")
    node.sign("app/signed", pushed.manifest_digest)
    code, output = node.pull("app/signed", "v1")
    assert code == 0, output
    stored = node.containerd.content_digests()
    assert pushed.manifest_digest in stored
    assert set(pushed.blobs) <= stored


def test_refuses_unsigned_image(node: Node) -> None:
    pushed = node.push("app/unsigned", "v1")
    assert_refused_without_blob_gets(node, pushed, "unsigned")
    status, body = node.get(f"/v2/app/unsigned/manifests/v1?ns={REGISTRY}")
    assert status == 403
    assert isinstance(body, dict)
    error = body["errors"][0]
    assert error["code"] == "DENIED"
    assert "registry.example.test/**" in error["message"]
    assert "cosign key keys/release.pub" in error["message"]


def test_refuses_image_signed_with_wrong_key(node: Node) -> None:
    pushed = node.push("app/wrongkey", "v1")
    node.sign("app/wrongkey", pushed.manifest_digest, key=cs.generate_key())
    assert_refused_without_blob_gets(node, pushed, "wrong key")


def test_refuses_tampered_manifest(node: Node) -> None:
    original = node.push("app/tampered", "orig")
    node.sign("app/tampered", original.manifest_digest)
    # The same image with one annotation added: new bytes, so a new digest, and the
    # original's signature copied next to it.
    doc = json.loads(original.manifest_bytes)
    doc["annotations"] = {"tampered": "yes"}
    raw = json.dumps(doc).encode()
    tampered_digest = str(Digest.of(raw))
    cs.push_to_registry(
        node.registry.url,
        "app/tampered",
        cs.Artifact(raw, original.media_type, (), tag="v1"),
    )
    payload = cs.simple_signing_payload(
        Digest.parse(original.manifest_digest), f"{REGISTRY}/app/tampered"
    )
    node.attach("app/tampered", tampered_digest, cs.sign_layer(node.key, payload))
    tampered = PushedArtifact(
        repository="app/tampered",
        tag="v1",
        manifest_digest=tampered_digest,
        manifest_bytes=raw,
        media_type=original.media_type,
        blobs=original.blobs,
        layer_digests=original.layer_digests,
    )
    assert_refused_without_blob_gets(node, tampered, "tampered manifest")


def test_refuses_signature_over_another_digest(node: Node) -> None:
    other = node.push("app/other", "v1")
    pushed = node.push("app/otherdigest", "v1")
    node.sign("app/otherdigest", pushed.manifest_digest, signed=other.manifest_digest)
    assert_refused_without_blob_gets(node, pushed, "signature over another digest")


def test_refuses_expired_certificate(node: Node) -> None:
    pushed = node.push("keyless/expired", "v1")
    payload = cs.simple_signing_payload(
        Digest.parse(pushed.manifest_digest), f"{REGISTRY}/keyless/expired"
    )
    signer = cs.generate_key()
    certificate = node.sigstore.issue_certificate(signer, lifetime=dt.timedelta(minutes=10))
    logged_after_expiry = int(certificate.not_valid_after_utc.timestamp()) + 3600
    layer = node.sigstore.sign_layer_keyless(
        signer, payload, certificate=certificate, integrated_time=logged_after_expiry
    )
    node.attach("keyless/expired", pushed.manifest_digest, layer)
    assert_refused_without_blob_gets(node, pushed, "expired certificate")


def test_refuses_certificate_from_untrusted_ca(node: Node) -> None:
    pushed = node.push("keyless/untrusted", "v1")
    payload = cs.simple_signing_payload(
        Digest.parse(pushed.manifest_digest), f"{REGISTRY}/keyless/untrusted"
    )
    rogue = cs.TestSigstore()  # same identity and issuer, another CA and log
    layer = rogue.sign_layer_keyless(cs.generate_key(), payload)
    node.attach("keyless/untrusted", pushed.manifest_digest, layer)
    assert_refused_without_blob_gets(node, pushed, "untrusted CA")


def test_keyless_signature_from_trusted_ca_pulls(node: Node) -> None:
    pushed = node.push("keyless/good", "v1")
    payload = cs.simple_signing_payload(
        Digest.parse(pushed.manifest_digest), f"{REGISTRY}/keyless/good"
    )
    layer = node.sigstore.sign_layer_keyless(cs.generate_key(), payload)
    node.attach("keyless/good", pushed.manifest_digest, layer)
    code, output = node.pull("keyless/good", "v1")
    assert code == 0, output


def test_tag_flipped_after_verification_never_serves_unverified_manifest(node: Node) -> None:
    signed = node.push("app/flip", "v1")
    node.sign("app/flip", signed.manifest_digest)
    status, body = node.get(f"/v2/app/flip/manifests/v1?ns={REGISTRY}")
    assert status == 200 and Digest.of(body) == Digest.parse(signed.manifest_digest)  # type: ignore[arg-type]
    flipped = node.push("app/flip", "v1")  # the tag now names an unsigned manifest
    status, body = node.get(f"/v2/app/flip/manifests/v1?ns={REGISTRY}")
    if status == 200:
        assert Digest.of(body) == Digest.parse(signed.manifest_digest)  # type: ignore[arg-type]
    else:
        assert status == 403
    assert node.image_blob_gets(flipped) == 0


def test_refuses_blob_not_referenced_by_a_verified_manifest(node: Node) -> None:
    signed = node.push("app/blobs", "v1")
    node.sign("app/blobs", signed.manifest_digest)
    unsigned = node.push("app/blobs", "unsigned")
    assert node.get(f"/v2/app/blobs/manifests/v1?ns={REGISTRY}")[0] == 200
    for blob in unsigned.layer_digests:
        status, body = node.get(f"/v2/app/blobs/blobs/{blob}?ns={REGISTRY}")
        assert status == 403
        assert isinstance(body, dict) and body["errors"][0]["code"] == "DENIED"
        assert node.registry.blob_gets(blob) == 0
    for blob in signed.layer_digests:
        assert node.get(f"/v2/app/blobs/blobs/{blob}?ns={REGISTRY}")[0] == 200


def test_refuses_cross_repository_blob(node: Node) -> None:
    signed = node.push("app/owner", "v1")
    node.sign("app/owner", signed.manifest_digest)
    assert node.get(f"/v2/app/owner/manifests/v1?ns={REGISTRY}")[0] == 200
    blob = signed.layer_digests[0]
    status, _ = node.get(f"/v2/app/stranger/blobs/{blob}?ns={REGISTRY}")
    assert status == 403


def test_refuses_shared_layer_through_unsigned_repository(node: Node) -> None:
    shared = deterministic_bytes(32 * 1024, seed=next(SEEDS))
    signed = push_image(node.registry.url, "app/signedshare", "v1", layers=[shared])
    node.sign("app/signedshare", signed.manifest_digest)
    unsigned = push_image(node.registry.url, "app/unsignedshare", "v1", layers=[shared])
    assert node.get(f"/v2/app/signedshare/manifests/v1?ns={REGISTRY}")[0] == 200
    layer = unsigned.layer_digests[0]
    assert layer == signed.layer_digests[0]
    before = node.registry.blob_gets(layer)
    status, _ = node.get(f"/v2/app/unsignedshare/blobs/{layer}?ns={REGISTRY}")
    assert status == 403
    assert node.registry.blob_gets(layer) == before


def _wait_for_reload(node: Node, metric: str, before: float, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.pullgate.metrics().get(metric, 0.0) > before:
            return
        time.sleep(0.2)
    raise AssertionError(f"{metric} did not increase within {timeout}s")


def test_hot_reload_obeys_new_policy_and_keeps_old_one_when_broken(node: Node) -> None:
    opened = node.push("open/app", "v1")
    signed = node.push("app/reload", "v1")
    node.sign("app/reload", signed.manifest_digest)
    by_tag = f"/v2/open/app/manifests/v1?ns={REGISTRY}"
    by_digest = f"/v2/open/app/manifests/{opened.manifest_digest}?ns={REGISTRY}"
    assert node.get(by_tag)[0] == 403

    # 1. A new policy that opts the repository out: the next pull obeys it.
    reloads = node.pullgate.metrics().get("pullgate_policy_reloads_total", 0.0)
    write_policy(
        node.policy,
        extra_scopes=(
            '  - match: "registry.example.test/open/**"\n    mode: allow\n'
            "    require: {anyOf: [{cosign: {key: keys/release.pub}}]}\n"
        ),
    )
    _wait_for_reload(node, "pullgate_policy_reloads_total", reloads)
    assert node.get(by_tag)[0] == 200
    assert node.get(by_digest)[0] == 200

    # 2. Back to the strict policy: the digest verified under the old one is refused too.
    reloads = node.pullgate.metrics().get("pullgate_policy_reloads_total", 0.0)
    write_policy(node.policy)
    _wait_for_reload(node, "pullgate_policy_reloads_total", reloads)
    assert node.get(by_digest)[0] == 403
    assert node.get(by_tag)[0] == 403

    # 3. A broken file is refused and counted; the strict policy stays in force.
    failures = node.pullgate.metrics().get("pullgate_policy_reload_failures_total", 0.0)
    node.policy.write_text("default: deny\nscopes:\n  - match: [unclosed\n")
    _wait_for_reload(node, "pullgate_policy_reload_failures_total", failures)
    assert node.get(by_tag)[0] == 403
    assert node.get(f"/v2/app/reload/manifests/v1?ns={REGISTRY}")[0] == 200
    assert "policy" in node.pullgate.log_text()


def _enable_notation(node: Node) -> Any:
    from tests.support.notation_sign import TestNotary

    notary = TestNotary()
    notary.write_trust(node.policy.parent / "notation")
    reloads = node.pullgate.metrics().get("pullgate_policy_reloads_total", 0.0)
    write_policy(
        node.policy,
        extra_scopes=(
            '  - match: "registry.example.test/notation/**"\n    mode: enforce\n'
            "    require: {allOf: [{notation: {trustPolicy: notation/trustpolicy.json,"
            " trustStore: notation/truststore}}]}\n"
        ),
    )
    _wait_for_reload(node, "pullgate_policy_reloads_total", reloads)
    return notary


def _attach_notation(node: Node, pushed: PushedArtifact, envelope: bytes, media_type: str) -> None:
    from tests.support.notation_sign import signature_artifact

    subject = {
        "mediaType": pushed.media_type,
        "digest": pushed.manifest_digest,
        "size": len(pushed.manifest_bytes),
    }
    artifact = signature_artifact(envelope, media_type, subject)
    cs.push_referrer(
        node.registry.url,
        pushed.repository,
        pushed.manifest_digest,
        artifact,
        "application/vnd.cncf.notary.signature",
    )


def test_notation_signed_image_pulls_and_target_mismatch_is_refused(node: Node) -> None:
    from tests.support.notation_sign import descriptor_of

    notary = _enable_notation(node)
    good = node.push("notation/good", "v1")
    _attach_notation(
        node,
        good,
        notary.cose(descriptor_of(good.manifest_bytes, good.media_type)),
        "application/cose",
    )
    code, output = node.pull("notation/good", "v1")
    assert code == 0, output

    other = node.push("notation/other", "v1")
    mismatched = node.push("notation/mismatch", "v1")
    # A valid signature, but over the other image's descriptor.
    envelope = notary.jws(descriptor_of(other.manifest_bytes, other.media_type))
    _attach_notation(node, mismatched, envelope, "application/jose+json")
    assert_refused_without_blob_gets(node, mismatched, "Notation target mismatch")
    status, body = node.get(f"/v2/notation/mismatch/manifests/v1?ns={REGISTRY}")
    assert status == 403 and isinstance(body, dict)
    assert "does not match" in body["errors"][0]["message"]
