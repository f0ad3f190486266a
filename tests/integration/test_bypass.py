"""Bypass suite: each case is named after what pullgate refuses, and asserts that zero
bytes of the gated content were served (no manifest body, no blob body) and that the
upstream registry served none of its blobs.

Each case also asserts why: the exact OCI error code and HTTP status, and a reason that
names the refused content, the policy scope and requirement that failed, and the check
inside it that failed (a pullgate refusing everything with a bare 403 fails every case).

One registry and one pullgate (with a policy covering cosign key and keyless, bundles,
Notation and OMS model signing) serve every case; each case pushes its own content.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.client
import http.server
import itertools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import hoststoml
from proxy.oci.digest import Digest
from proxy.oci.manifest import Descriptor
from tests.support import cosign_sign as cs
from tests.support import counts
from tests.support.notation_sign import TestNotary, descriptor_of, signature_artifact
from tests.support.ocilayout import (
    PushedArtifact,
    deterministic_bytes,
    push_image,
    push_manifest,
    push_model,
)
from tests.support.peers import Containerd, Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
SEEDS = itertools.count(30_000)
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
BOMB_PREDICATE = "https://example.test/attestation/v1"

POLICY = """\
default: deny
trust:
  sigstoreTrustedRoot: trust/trusted_root.json
limits:
  {maxSignatures: 16, maxSignatureManifestBytes: 65536, maxBundleBytes: 65536, deadlineSeconds: 10}
scopes:
  - match: "registry.example.test/keyless/**"
    require:
      anyOf:
        - cosign:
            keyless: {issuer: "https://issuer.example.test", subject: "signer@example.test"}
            tlog: required
  - match: "registry.example.test/attest/**"
    require:
      anyOf:
        - cosign: {key: keys/release.pub, predicateType: "https://example.test/attestation/v1"}
  - match: "registry.example.test/notation/**"
    require:
      allOf:
        - notation: {trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}
  - match: "registry.example.test/models/**"
    artifactTypes: ["application/vnd.cncf.model.manifest.v1+json"]
    require: {anyOf: [{modelSigning: {key: keys/model.pub}}]}
  - match: "registry.example.test/**"
    require: {allOf: [{cosign: {key: keys/release.pub}}]}
"""


@dataclass(frozen=True)
class Requirement:
    """A policy requirement as a refusal names it: the scope that matched and the
    requirement of that scope that failed (both quoted literally in the message)."""

    scope: str
    failed: str


RELEASE_KEY = Requirement(
    "registry.example.test/**",
    "allOf failed: cosign key keys/release.pub: "
    "no cosign signature verified with key keys/release.pub",
)
KEYLESS = Requirement(
    "registry.example.test/keyless/**",
    "anyOf failed: cosign keyless issuer=https://issuer.example.test "
    "subject=signer@example.test: no cosign signature verified with keyless "
    "issuer=https://issuer.example.test subject=signer@example.test",
)
ATTESTATION = Requirement(
    "registry.example.test/attest/**",
    "anyOf failed: cosign key keys/release.pub: "
    "no cosign signature verified with key keys/release.pub",
)
NOTATION = Requirement(
    "registry.example.test/notation/**",
    "allOf failed: notation trustPolicy notation/trustpolicy.json: no Notation signature verified",
)
MODEL = Requirement(
    "registry.example.test/models/**",
    "anyOf failed: modelSigning key keys/model.pub: modelSigning",
)


def _rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_refusal(pushed: PushedArtifact, requirement: Requirement, reason: str) -> str:
    """The message refusing ``pushed`` because ``requirement`` failed for ``reason`` (a
    regular expression): it names the manifest by digest, the scope and the requirement."""
    return (
        re.escape(
            f"{REGISTRY}/{pushed.repository}@{pushed.manifest_digest}: "
            f'scope "{requirement.scope}" (enforce): {requirement.failed}: '
        )
        + reason
    )


def error_of(body: bytes) -> dict[str, Any]:
    """The one OCI error of a refusal body."""
    errors = json.loads(body)["errors"]
    assert len(errors) == 1, errors
    error: dict[str, Any] = errors[0]
    return error


def assert_refused(
    status: int, body: bytes, *, expect_status: int, code: str, reason: str
) -> dict[str, Any]:
    """``body`` is one OCI error with ``code`` and ``expect_status``, whose message
    matches the regular expression ``reason`` in full."""
    error = error_of(body)
    assert (status, error["code"]) == (expect_status, code), error
    assert re.fullmatch(reason, error["message"]), (
        f"refusal reason {error['message']!r} does not match {reason!r}"
    )
    return error


@dataclass
class Env:
    registry: Registry
    pullgate: Pullgate
    key: cs.TestKey
    model_key: cs.TestKey
    sigstore: cs.TestSigstore
    notary: TestNotary

    # -- content ---------------------------------------------------------------------

    def image(self, repository: str, *, layers: list[bytes] | None = None) -> PushedArtifact:
        layers = layers or [deterministic_bytes(8192, next(SEEDS))]
        return push_image(self.registry.url, repository, "v1", layers=layers)

    def attach(self, pushed: PushedArtifact, *layers: cs.SignatureLayer) -> None:
        artifact = cs.signature_image(Digest.parse(pushed.manifest_digest), list(layers))
        cs.push_to_registry(self.registry.url, pushed.repository, artifact)

    def payload(self, pushed: PushedArtifact, digest: str | None = None) -> bytes:
        return cs.simple_signing_payload(
            Digest.parse(digest or pushed.manifest_digest), f"{REGISTRY}/{pushed.repository}"
        )

    def referrer(self, pushed: PushedArtifact, artifact: cs.Artifact, artifact_type: str) -> None:
        cs.push_referrer(
            self.registry.url, pushed.repository, pushed.manifest_digest, artifact, artifact_type
        )

    def subject(self, pushed: PushedArtifact) -> Descriptor:
        return Descriptor(
            media_type=pushed.media_type,
            digest=Digest.parse(pushed.manifest_digest),
            size=len(pushed.manifest_bytes),
        )

    # -- requests --------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, bytes]:
        host, port = self.pullgate.host.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("GET", path, headers={"Accept": ACCEPT})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def assert_gated(
        self, pushed: PushedArtifact, requirement: Requirement, *, reason: str
    ) -> dict[str, Any]:
        """Zero bytes of ``pushed`` served: manifest by tag and digest, and every blob.

        The manifest is refused 403 ``DENIED``, naming ``pushed`` by digest, the scope
        and requirement that failed, then ``reason`` (a regular expression for why, which
        must match the rest of the message);
        every blob is refused as not referenced by a verified manifest of the repository.
        """
        base = f"/v2/{pushed.repository}"
        error: dict[str, Any] = {}
        for reference in (pushed.tag, pushed.manifest_digest):
            status, body = self.get(f"{base}/manifests/{reference}?ns={REGISTRY}")
            assert status >= 400, f"manifest {reference} was served"
            assert pushed.manifest_bytes not in body
            error = assert_refused(
                status,
                body,
                expect_status=403,
                code="DENIED",
                reason=manifest_refusal(pushed, requirement, reason),
            )
            assert error["detail"]["scope"] == requirement.scope, error
        for blob in pushed.blobs:
            self.assert_blob_refused(pushed.repository, blob)
        return error

    def assert_blob_refused(self, repository: str, blob: str) -> None:
        """``blob`` is refused through ``repository`` as referenced by none of its
        verified manifests, and never left the upstream registry."""
        status, body = self.get(f"/v2/{repository}/blobs/{blob}?ns={REGISTRY}")
        assert status == 403, f"blob {blob} answered {status}"
        assert_refused(
            status,
            body,
            expect_status=403,
            code="DENIED",
            reason=re.escape(
                f"blob {blob} is not referenced by any verified manifest of "
                f"{REGISTRY}/{repository}; "
                "pull a verified manifest that references it first"
            ),
        )
        assert self.registry.blob_gets(blob) == 0, f"blob {blob} left the registry"

    def assert_served(self, pushed: PushedArtifact) -> None:
        status, body = self.get(f"/v2/{pushed.repository}/manifests/{pushed.tag}?ns={REGISTRY}")
        assert status == 200 and body == pushed.manifest_bytes


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("bypass")
    policy_dir = work / "policy"
    key, model_key = cs.generate_key(), cs.generate_key("ecdsa-p384")
    key.write_public(policy_dir / "keys" / "release.pub")
    model_key.write_public(policy_dir / "keys" / "model.pub")
    sigstore = cs.TestSigstore()
    sigstore.write_trusted_root(policy_dir / "trust" / "trusted_root.json")
    notary = TestNotary()
    notary.write_trust(policy_dir / "notation")
    (policy_dir / "policy.yaml").write_text(POLICY)
    registry = Registry(work / "registry").start()
    pullgate = Pullgate(
        work / "pullgate", upstreams={REGISTRY: registry.url}, policy=policy_dir / "policy.yaml"
    )
    try:
        pullgate.start()
        yield Env(registry, pullgate, key, model_key, sigstore, notary)
    finally:
        pullgate.stop()
        registry.stop()


@pytest.fixture(autouse=True)
def count_case(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.name.startswith("test_refuses_"):
        counts.add("bypass cases")


# ---- signatures and trust -----------------------------------------------------------


def test_control_signed_image_is_served(env: Env) -> None:
    pushed = env.image("bypass/control")
    env.attach(pushed, cs.sign_layer(env.key, env.payload(pushed)))
    env.assert_served(pushed)


def test_refuses_unsigned_image(env: Env) -> None:
    error = env.assert_gated(
        env.image("bypass/unsigned"), RELEASE_KEY, reason="no signatures found"
    )
    assert error["code"] == "DENIED" and "no signatures found" in error["message"]


def test_refuses_signature_by_wrong_key(env: Env) -> None:
    pushed = env.image("bypass/wrongkey")
    env.attach(pushed, cs.sign_layer(cs.generate_key(), env.payload(pushed)))
    env.assert_gated(
        pushed, RELEASE_KEY, reason="signature does not verify with the ECDSA secp256r1 key"
    )


def test_refuses_tampered_manifest(env: Env) -> None:
    original = env.image("bypass/tampered")
    doc = json.loads(original.manifest_bytes)
    doc["annotations"] = {"evil": "1"}
    raw = json.dumps(doc).encode()
    push_manifest(env.registry.url, "bypass/tampered", "v1", raw, original.media_type)
    tampered = PushedArtifact(
        "bypass/tampered", "v1", str(Digest.of(raw)), raw, original.media_type, original.blobs
    )
    env.attach(tampered, cs.sign_layer(env.key, env.payload(original)))
    env.assert_gated(
        tampered,
        RELEASE_KEY,
        reason=re.escape(
            f"payload digest does not match (signed {original.manifest_digest}, "
            f"manifest {tampered.manifest_digest})"
        ),
    )


def test_refuses_signature_over_another_digest(env: Env) -> None:
    other = env.image("bypass/other")
    pushed = env.image("bypass/otherdigest")
    env.attach(pushed, cs.sign_layer(env.key, env.payload(pushed, other.manifest_digest)))
    error = env.assert_gated(
        pushed,
        RELEASE_KEY,
        reason=re.escape(
            f"payload digest does not match (signed {other.manifest_digest}, "
            f"manifest {pushed.manifest_digest})"
        ),
    )
    assert "digest" in error["message"]


def test_refuses_signature_payload_of_wrong_type(env: Env) -> None:
    pushed = env.image("bypass/wrongtype")
    payload = cs.simple_signing_payload(
        Digest.parse(pushed.manifest_digest), f"{REGISTRY}/bypass/wrongtype", signature_type="x"
    )
    env.attach(pushed, cs.sign_layer(env.key, payload))
    env.assert_gated(pushed, RELEASE_KEY, reason="payload type 'x' is not a cosign signature")


def test_refuses_certificate_not_chaining_to_trust_root(env: Env) -> None:
    """A certificate from a rogue CA, logged in the trusted Rekor: only the chain fails."""
    pushed = env.image("keyless/rogue")
    signer = cs.generate_key()
    rogue_cert = cs.TestSigstore().issue_certificate(signer)
    logged = int(rogue_cert.not_valid_before_utc.timestamp()) + 1
    env.attach(
        pushed,
        env.sigstore.sign_layer_keyless(
            signer, env.payload(pushed), certificate=rogue_cert, integrated_time=logged
        ),
    )
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=re.escape(
            f"certificate does not chain to a trusted CA at {_rfc3339(logged)}: "
            "validation failed: candidates exhausted: signature does not match"
        ),
    )


def test_refuses_rekor_entry_from_untrusted_log(env: Env) -> None:
    """A whole rogue Sigstore (CA, Rekor and CT log): its log is not in the trusted root."""
    pushed = env.image("keyless/roguelog")
    rogue = cs.TestSigstore()
    env.attach(pushed, rogue.sign_layer_keyless(cs.generate_key(), env.payload(pushed)))
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=re.escape(f"Rekor log {rogue.log_id.hex()[:16]}")
        + r"\S* is not in the trusted root",
    )


def test_refuses_expired_certificate(env: Env) -> None:
    pushed = env.image("keyless/expired")
    signer = cs.generate_key()
    cert = env.sigstore.issue_certificate(signer)
    late = int(cert.not_valid_after_utc.timestamp()) + 60
    env.attach(
        pushed,
        env.sigstore.sign_layer_keyless(
            signer, env.payload(pushed), certificate=cert, integrated_time=late
        ),
    )
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=_certificate_not_valid_at(late),
    )


def _certificate_not_valid_at(timestamp: int) -> str:
    """The refusal of a certificate outside its validity at the Rekor integrated time
    (the parenthesised tail is cryptography's own diagnostic)."""
    return (
        re.escape(
            f"certificate does not chain to a trusted CA at {_rfc3339(timestamp)}: "
            "validation failed: cert is not valid at validation time"
        )
        + r"(?: \(.*\))?"
    )


def test_refuses_not_yet_valid_certificate(env: Env) -> None:
    pushed = env.image("keyless/notyet")
    signer = cs.generate_key()
    cert = env.sigstore.issue_certificate(signer)
    early = int(cert.not_valid_before_utc.timestamp()) - 60
    env.attach(
        pushed,
        env.sigstore.sign_layer_keyless(
            signer, env.payload(pushed), certificate=cert, integrated_time=early
        ),
    )
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=_certificate_not_valid_at(early),
    )


def test_refuses_keyless_signature_of_other_identity(env: Env) -> None:
    pushed = env.image("keyless/identity")
    layer = env.sigstore.sign_layer_keyless(
        cs.generate_key(), env.payload(pushed), identity="mallory@example.test"
    )
    env.attach(pushed, layer)
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=re.escape(
            "certificate identity (mallory@example.test) does not match signer@example.test"
        ),
    )


def test_refuses_keyless_signature_without_rekor_entry(env: Env) -> None:
    pushed = env.image("keyless/notlog")
    env.attach(
        pushed,
        env.sigstore.sign_layer_keyless(cs.generate_key(), env.payload(pushed), with_set=False),
    )
    env.assert_gated(pushed, KEYLESS, reason=re.escape("no Rekor bundle (tlog: required)"))


def test_refuses_rekor_entry_not_bound_to_signature(env: Env) -> None:
    """CVE-2026-22703: a valid log entry for another signature of the same payload."""
    pushed = env.image("keyless/unbound")
    signer = cs.generate_key()
    cert = env.sigstore.issue_certificate(signer)
    payload = env.payload(pushed)
    honest = env.sigstore.sign_layer_keyless(signer, payload, certificate=cert)
    other = env.sigstore.sign_layer_keyless(signer, payload, certificate=cert)
    annotations = dict(honest.annotations)
    annotations["dev.sigstore.cosign/bundle"] = other.annotations["dev.sigstore.cosign/bundle"]
    if (
        annotations["dev.cosignproject.cosign/signature"]
        == other.annotations["dev.cosignproject.cosign/signature"]
    ):
        pytest.fail("the signer produced identical signatures; the case proves nothing")
    env.attach(pushed, cs.SignatureLayer(payload, annotations))
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=re.escape("Rekor entry is for another signature (not bound to signature)"),
    )


def test_refuses_rekor_entry_not_bound_to_artifact(env: Env) -> None:
    """CVE-2022-23649: a log entry whose hash is another payload's."""
    pushed = env.image("keyless/otherartifact")
    signer = cs.generate_key()
    cert = env.sigstore.issue_certificate(signer)
    payload = env.payload(pushed)
    honest = env.sigstore.sign_layer_keyless(signer, payload, certificate=cert)
    elsewhere = env.sigstore.sign_layer_keyless(signer, b'{"other": 1}', certificate=cert)
    annotations = dict(honest.annotations)
    annotations["dev.sigstore.cosign/bundle"] = elsewhere.annotations["dev.sigstore.cosign/bundle"]
    env.attach(pushed, cs.SignatureLayer(payload, annotations))
    env.assert_gated(
        pushed,
        KEYLESS,
        reason=re.escape("Rekor entry is for another artifact hash (not bound to payload)"),
    )


def test_refuses_bare_public_key_where_certificate_is_expected(env: Env) -> None:
    """GHSA-fx35-mq7g-6g98: a key-only bundle under a keyless policy."""
    pushed = env.image("keyless/barekey")
    bundle = cs.message_signature_bundle(cs.generate_key(), Digest.parse(pushed.manifest_digest))
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(pushed)), cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed, KEYLESS, reason="bundle carries a bare public key where a certificate is required"
    )


def test_control_cosign_sign_bundle_is_served(env: Env) -> None:
    """What ``cosign sign --new-bundle-format`` attaches: a DSSE bundle of cosign's sign
    statement, as a referrer (found through the fallback tag)."""
    pushed = env.image("bypass/bundle-signed")
    statement = cs.sign_statement(Digest.parse(pushed.manifest_digest))
    bundle = cs.dsse_bundle(env.key, statement)
    referrer = cs.bundle_referrer(
        bundle, env.subject(pushed), predicate_type=cs.COSIGN_SIGN_PREDICATE
    )
    env.referrer(pushed, referrer, cs.BUNDLE_TYPE)
    env.assert_served(pushed)


def test_refuses_cosign_attestation_as_signature(env: Env) -> None:
    """A CI that attests the provenance of every image it builds (``cosign attest``, the
    release key, about this very digest) has not signed them: a plain ``cosign:``
    requirement takes only signatures."""
    pushed = env.image("bypass/attested-only")
    provenance = "https://slsa.dev/provenance/v1"
    statement = cs.in_toto_statement(
        Digest.parse(pushed.manifest_digest), provenance, name=f"{REGISTRY}/{pushed.repository}"
    )
    bundle = cs.dsse_bundle(env.key, statement)
    referrer = cs.bundle_referrer(bundle, env.subject(pushed), predicate_type=provenance)
    env.referrer(pushed, referrer, cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed,
        RELEASE_KEY,
        reason=re.escape(
            f"bundle is an attestation (predicate type '{provenance}'), not a cosign "
            "signature (https://sigstore.dev/cosign/sign/v1); attestations count only "
            "under attestation:"
        ),
    )


def test_refuses_dsse_payload_type_mismatch(env: Env) -> None:
    """GHSA-w6c6-c85g-mmv6."""
    pushed = env.image("attest/payloadtype")
    statement = cs.in_toto_statement(Digest.parse(pushed.manifest_digest), BOMB_PREDICATE)
    bundle = cs.dsse_bundle(env.key, statement, payload_type="text/plain")
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(pushed)), cs.BUNDLE_TYPE)
    env.assert_gated(pushed, ATTESTATION, reason="DSSE payloadType 'text/plain' is not in-toto")


def test_refuses_dsse_predicate_type_mismatch(env: Env) -> None:
    pushed = env.image("attest/predicate")
    statement = cs.in_toto_statement(
        Digest.parse(pushed.manifest_digest), "https://slsa.dev/provenance/v1"
    )
    bundle = cs.dsse_bundle(env.key, statement)
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(pushed)), cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed,
        ATTESTATION,
        reason=re.escape(
            f"predicate type 'https://slsa.dev/provenance/v1' is not '{BOMB_PREDICATE}'"
        ),
    )


def test_refuses_dsse_statement_about_another_artifact(env: Env) -> None:
    pushed = env.image("attest/othersubject")
    other = env.image("attest/othersubject2")
    statement = cs.in_toto_statement(Digest.parse(other.manifest_digest), BOMB_PREDICATE)
    bundle = cs.dsse_bundle(env.key, statement)
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(pushed)), cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed,
        ATTESTATION,
        reason=re.escape(f"in-toto statement is not about {pushed.manifest_digest}"),
    )


# ---- Notation ---------------------------------------------------------------------------


def _notation(env: Env, repository: str, **options: Any) -> PushedArtifact:
    pushed = env.image(repository)
    target = descriptor_of(pushed.manifest_bytes, pushed.media_type)
    signed = dict(target, **options.pop("target", {}))
    notary = options.pop("notary", env.notary)
    envelope = notary.jws(signed, **options)
    env.referrer(
        pushed,
        signature_artifact(envelope, "application/jose+json", target),
        "application/vnd.cncf.notary.signature",
    )
    return pushed


def test_control_notation_signed_image_is_served(env: Env) -> None:
    env.assert_served(_notation(env, "notation/control"))


def test_refuses_notation_target_digest_mismatch(env: Env) -> None:
    pushed = _notation(env, "notation/digest", target={"digest": str(Digest.of(b"x"))})
    error = env.assert_gated(
        pushed,
        NOTATION,
        reason=re.escape(
            f"signature target digest {Digest.of(b'x')} does not match {pushed.manifest_digest}"
        ),
    )
    assert "does not match" in error["message"]


def test_refuses_notation_target_size_mismatch(env: Env) -> None:
    pushed = _notation(env, "notation/size", target={"size": 1})
    env.assert_gated(
        pushed,
        NOTATION,
        reason=f"signature target size 1 does not match {len(pushed.manifest_bytes)}",
    )


def test_refuses_notation_target_media_type_mismatch(env: Env) -> None:
    media_type = "application/vnd.docker.distribution.manifest.v2+json"
    pushed = _notation(env, "notation/mediatype", target={"mediaType": media_type})
    env.assert_gated(
        pushed,
        NOTATION,
        reason=re.escape(
            f"signature target media type {media_type} does not match {pushed.media_type}"
        ),
    )


def test_refuses_expired_notation_signature(env: Env) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    error = env.assert_gated(
        _notation(env, "notation/expired", expiry=past),
        NOTATION,
        reason=f"signature expired at {past:%Y-%m-%dT%H:%M:%SZ}",
    )
    assert "expired" in error["message"]


def test_refuses_notation_signature_from_untrusted_ca(env: Env) -> None:
    env.assert_gated(
        _notation(env, "notation/untrusted", notary=TestNotary()),
        NOTATION,
        reason="the certificate chain does not reach a certificate in the trust store",
    )


def test_refuses_notation_signature_of_untrusted_identity(env: Env) -> None:
    """A leaf of the trusted CA whose subject is not in ``trustedIdentities``."""
    mallory = env.notary.signer("mallory")
    env.assert_gated(
        _notation(env, "notation/identity", notary=mallory),
        NOTATION,
        reason=re.escape("signer C=US,O=pullgate,CN=mallory is not a trusted identity"),
    )


def test_refuses_notation_unknown_critical_header(env: Env) -> None:
    env.assert_gated(
        _notation(env, "notation/crit", extra_critical=("io.example.new",)),
        NOTATION,
        reason=re.escape(
            "unsupported critical headers ['io.example.new'] "
            "(verification plugins are not supported)"
        ),
    )


def test_refuses_tampered_notation_envelope(env: Env) -> None:
    env.assert_gated(
        _notation(env, "notation/tampered", tamper=True),
        NOTATION,
        reason=re.escape("the envelope's signature does not verify (integrity)"),
    )


# ---- tags, blobs and referrers ----------------------------------------------------------


def test_refuses_tag_flipped_after_verification(env: Env) -> None:
    signed = env.image("bypass/flip")
    env.attach(signed, cs.sign_layer(env.key, env.payload(signed)))
    env.assert_served(signed)
    flipped = env.image("bypass/flip")  # same tag, unsigned manifest
    env.assert_gated(flipped, RELEASE_KEY, reason="no signatures found")


def test_refuses_blob_not_referenced_by_a_verified_manifest(env: Env) -> None:
    signed = env.image("bypass/blobs")
    env.attach(signed, cs.sign_layer(env.key, env.payload(signed)))
    env.assert_served(signed)
    stray = push_image(
        env.registry.url, "bypass/blobs", "stray", layers=[deterministic_bytes(5000, 77)]
    )
    for blob in stray.layer_digests:
        status, _ = env.get(f"/v2/bypass/blobs/blobs/{blob}?ns={REGISTRY}")
        assert status == 403 and env.registry.blob_gets(blob) == 0
        env.assert_blob_refused("bypass/blobs", blob)


def test_refuses_cross_repository_blob(env: Env) -> None:
    signed = env.image("bypass/owner")
    env.attach(signed, cs.sign_layer(env.key, env.payload(signed)))
    env.assert_served(signed)
    for blob in signed.layer_digests:
        status, _ = env.get(f"/v2/bypass/stranger/blobs/{blob}?ns={REGISTRY}")
        assert status == 403
        assert env.registry.blob_gets(blob) == 0
        env.assert_blob_refused("bypass/stranger", blob)


def test_refuses_shared_layer_through_unsigned_repository(env: Env) -> None:
    shared = deterministic_bytes(6000, next(SEEDS))
    signed = push_image(env.registry.url, "bypass/shared-signed", "v1", layers=[shared])
    env.attach(signed, cs.sign_layer(env.key, env.payload(signed)))
    env.assert_served(signed)
    unsigned = push_image(env.registry.url, "bypass/shared-unsigned", "v1", layers=[shared])
    env.assert_gated(unsigned, RELEASE_KEY, reason="no signatures found")


def test_refuses_referrer_spoofing_with_subject_of_another_digest(env: Env) -> None:
    pushed = env.image("attest/spoof")
    other = env.image("attest/spoof2")
    statement = cs.in_toto_statement(Digest.parse(other.manifest_digest), BOMB_PREDICATE)
    bundle = cs.dsse_bundle(env.key, statement)
    # A valid bundle about another image, listed under ours in the fallback index.
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(other)), cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed,
        ATTESTATION,
        reason=re.escape("bundle referrer is about another manifest (subject mismatch)"),
    )


def test_refuses_signature_copied_from_another_repository(env: Env) -> None:
    source = env.image("bypass/source")
    env.attach(source, cs.sign_layer(env.key, env.payload(source)))
    copy = env.image("bypass/copy")
    env.attach(copy, cs.sign_layer(env.key, env.payload(source)))
    env.assert_gated(
        copy,
        RELEASE_KEY,
        reason=re.escape(
            f"payload digest does not match (signed {source.manifest_digest}, "
            f"manifest {copy.manifest_digest})"
        ),
    )


# ---- hostile sizes and shapes -----------------------------------------------------------


def test_refuses_signature_flood(env: Env) -> None:
    pushed = env.image("bypass/flood")
    rogue = cs.generate_key()
    layers = [cs.sign_layer(rogue, env.payload(pushed)) for _ in range(1000)]
    artifact = cs.signature_image(Digest.parse(pushed.manifest_digest), layers)
    cs.push_to_registry(env.registry.url, pushed.repository, artifact)
    # 1000 signatures do not fit the signature-manifest cap, which refuses them unread.
    env.assert_gated(pushed, RELEASE_KEY, reason=_oversize_signature_manifest(pushed))


def test_refuses_oversize_bundle(env: Env) -> None:
    pushed = env.image("attest/oversize")
    bundle = cs.message_signature_bundle(env.key, Digest.parse(pushed.manifest_digest))
    doc = json.loads(bundle)
    doc["padding"] = "x" * 200_000
    oversize = json.dumps(doc).encode()
    env.referrer(pushed, cs.bundle_referrer(oversize, env.subject(pushed)), cs.BUNDLE_TYPE)
    env.assert_gated(
        pushed, ATTESTATION, reason=f"bundle of {len(oversize)} bytes exceeds the cap of 65536"
    )


def test_refuses_oversize_signature_manifest(env: Env) -> None:
    pushed = env.image("bypass/bigsig")
    layer = cs.sign_layer(env.key, env.payload(pushed))
    layer.annotations["padding"] = "x" * 100_000
    env.attach(pushed, layer)
    env.assert_gated(pushed, RELEASE_KEY, reason=_oversize_signature_manifest(pushed))


def _oversize_signature_manifest(pushed: PushedArtifact) -> str:
    """The refusal of a cosign signature manifest over ``maxSignatureManifestBytes``."""
    tag = pushed.manifest_digest.replace(":", "-") + ".sig"
    return re.escape(
        f"signature manifest {tag}: manifest {tag} of {REGISTRY}/{pushed.repository} "
        "is larger than 65536 bytes"
    )


@contextlib.contextmanager
def hostile_upstream(manifest: bytes, media_type: str) -> Iterator[str]:
    """A registry that serves what docker-registry refuses to store (a real one cannot)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if "/manifests/" in self.path:
                self.send_response(200)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(manifest)))
                self.end_headers()
                self.wfile.write(manifest)
            else:
                self.send_response(200 if self.path.startswith("/v2/") else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _hostile_get(tmp_path: Path, raw: bytes, media_type: str) -> tuple[int, bytes]:
    with hostile_upstream(raw, media_type) as url:
        pullgate = Pullgate(tmp_path / "pg", upstreams={REGISTRY: url}).start()
        try:
            host, port = pullgate.host.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("GET", f"/v2/bypass/hostile/manifests/v1?ns={REGISTRY}")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            pullgate.stop()


def test_refuses_manifest_over_4_mib(env: Env, tmp_path: Path) -> None:
    """CVE-2017-11468 (even with no policy at all, the size cap holds)."""
    doc = json.loads(env.image("bypass/huge").manifest_bytes)
    doc["annotations"] = {"pad": "x" * (4 * 1024 * 1024 + 10)}
    raw = json.dumps(doc).encode()
    status, body = _hostile_get(tmp_path, raw, doc["mediaType"])
    assert status == 413 and len(body) < 10_000
    assert json.loads(body)["errors"][0]["code"] == "SIZE_INVALID"
    assert_refused(
        status,
        body,
        expect_status=413,
        code="SIZE_INVALID",
        reason=re.escape(
            f"manifest v1 of {REGISTRY}/bypass/hostile is larger than {4 * 1024 * 1024} bytes"
        ),
    )


def test_refuses_manifest_index_ambiguity(env: Env, tmp_path: Path) -> None:
    """CVE-2021-41190 (even with no policy at all)."""
    doc = json.loads(env.image("bypass/ambiguous").manifest_bytes)
    doc["manifests"] = []
    raw = json.dumps(doc).encode()
    status, body = _hostile_get(tmp_path, raw, doc["mediaType"])
    assert status >= 400 and raw not in body
    assert_refused(
        status,
        body,
        expect_status=400,
        code="MANIFEST_INVALID",
        reason=re.escape(
            "ambiguous document: it has both 'layers' and 'manifests' (CVE-2021-41190)"
        ),
    )


@pytest.mark.parametrize(
    ("path", "code", "reason"),
    [
        (
            "/v2/bypass/x/blobs/sha256:../../../etc/passwd",
            "NAME_INVALID",
            "empty, '.' or '..' path segment in '/v2/bypass/x/blobs/sha256:../../../etc/passwd'",
        ),
        (
            "/v2/bypass/x/blobs/sha256%3a..%2f..%2fetc",
            "NAME_INVALID",
            "percent-encoded characters are not allowed in registry paths: "
            "'/v2/bypass/x/blobs/sha256:../../etc'",
        ),
        (
            "/v2/bypass/x/blobs/../../control/blobs/sha256:" + "0" * 64,
            "NAME_INVALID",
            "empty, '.' or '..' path segment in "
            f"'/v2/bypass/x/blobs/../../control/blobs/sha256:{'0' * 64}'",
        ),
        (
            "/v2/bypass/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            "DIGEST_INVALID",
            "unsupported digest algorithm 'md5'",
        ),
    ],
    ids=["dot-dot-in-digest", "percent-encoded", "dot-dot-to-other-repository", "md5"],
)
def test_refuses_digest_path_traversal(env: Env, path: str, code: str, reason: str) -> None:
    """CVE-2024-3727."""
    status, body = env.get(path + f"?ns={REGISTRY}")
    assert status == 400 and json.loads(body)["errors"][0]["code"]
    assert_refused(status, body, expect_status=400, code=code, reason=re.escape(reason))


def test_refuses_unsigned_model_with_decompression_bomb_layer(env: Env) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB from ~65 KiB
    pushed = push_model(env.registry.url, "models/bomb", "v1", files={"weights.tar.gz": bomb})
    env.assert_gated(pushed, MODEL, reason="no model signatures found")


def test_refuses_model_with_unsigned_extra_layer(env: Env) -> None:
    files = {"config.json": b"{}", "weights.bin": deterministic_bytes(4096, next(SEEDS))}
    signed_files = {"config.json": b"{}"}
    pushed = push_model(env.registry.url, "models/extra", "v1", files=files)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in signed_files.items()}
    combined = hashlib.sha256(b"".join(bytes.fromhex(digests[n]) for n in sorted(digests)))
    statement = json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "model", "digest": {"sha256": combined.hexdigest()}}],
            "predicateType": "https://model_signing/signature/v1.0",
            "predicate": {
                "resources": [
                    {"name": n, "algorithm": "sha256", "digest": d} for n, d in digests.items()
                ]
            },
        }
    ).encode()
    bundle = cs.dsse_bundle(env.model_key, statement)
    env.referrer(pushed, cs.bundle_referrer(bundle, env.subject(pushed)), cs.BUNDLE_TYPE)
    error = env.assert_gated(
        pushed, MODEL, reason="file weights.bin is not covered by the signature"
    )
    assert "not covered" in error["message"]


def test_refuses_unlisted_registry_write_and_reads_nothing(env: Env) -> None:
    def upstream_requests() -> int:
        return sum("/v2/bypass/control/" in entry.path for entry in env.registry.access_log())

    before = upstream_requests()
    host, port = env.pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("PUT", f"/v2/bypass/control/manifests/v1?ns={REGISTRY}", body=b"{}")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 405 and json.loads(body)["errors"][0]["code"]
    assert_refused(
        response.status,
        body,
        expect_status=405,
        code="UNSUPPORTED",
        reason="PUT is not supported: pullgate is a read-only mirror",
    )
    assert upstream_requests() == before, "the refused write reached the upstream"


# ---- deployment -------------------------------------------------------------------------


def test_refuses_hosts_toml_that_lets_containerd_fall_back(env: Env, tmp_path: Path) -> None:
    """A mirror listed as a [host] with the upstream as server is bypassed on refusal;
    pullgate's own file is not, as real containerd shows."""
    unsigned = env.image("bypass/fallback")
    fallback = (
        f'server = "{env.registry.url}"\n[host."{env.pullgate.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    with pytest.raises(hoststoml.HostsTomlError):
        hoststoml.check_no_fallback(fallback, env.pullgate.url)

    containerd = Containerd(tmp_path / "ctd").start()
    try:
        bad = containerd.certs_dir / REGISTRY
        bad.mkdir(parents=True)
        (bad / "hosts.toml").write_text(fallback)
        ref = f"{REGISTRY}/bypass/fallback:v1"
        args = ("content", "fetch", "--plain-http", "--hosts-dir", str(containerd.certs_dir), ref)
        bypassed = containerd.ctr(*args, check=False)
        assert bypassed.returncode == 0, "containerd did not fall back: the case proves nothing"

        fresh = Containerd(tmp_path / "ctd2").start()
        try:
            fresh.write_hosts(REGISTRY, env.pullgate.url)
            log_mark = len(env.pullgate.log_text())
            refused = fresh.ctr(
                "content", "fetch", "--plain-http", "--hosts-dir", str(fresh.certs_dir), ref,
                check=False,
            )  # fmt: skip
            assert refused.returncode != 0
            assert unsigned.manifest_digest not in fresh.content_digests()
            # containerd stopped at pullgate's 403 (no fallback, no connection error) ...
            assert (
                f"pulling from host {env.pullgate.host} failed with status code "
                "[manifests v1]: 403 Forbidden" in refused.stderr
            ), refused.stderr
            # ... which refused the unsigned manifest for its missing signature.
            denial = manifest_refusal(unsigned, RELEASE_KEY, "no signatures found")
            logged = env.pullgate.log_text()[log_mark:]
            assert re.search(f"denied {denial}$", logged, re.MULTILINE), "no denial logged"
            status, body = env.get(f"/v2/bypass/fallback/manifests/v1?ns={REGISTRY}")
            assert_refused(status, body, expect_status=403, code="DENIED", reason=denial)
        finally:
            fresh.stop()
    finally:
        containerd.stop()


def test_refuses_100mb_bundle_with_bounded_memory(env: Env) -> None:
    pushed = env.image("attest/huge-bundle")
    bundle = cs.message_signature_bundle(env.key, Digest.parse(pushed.manifest_digest))
    doc = json.loads(bundle)
    doc["padding"] = "x" * (100 * 1024 * 1024)
    huge = json.dumps(doc).encode()
    env.referrer(pushed, cs.bundle_referrer(huge, env.subject(pushed)), cs.BUNDLE_TYPE)
    with open(f"/proc/{env.pullgate.pid}/status") as status:
        before = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    env.assert_gated(
        pushed, ATTESTATION, reason=f"bundle of {len(huge)} bytes exceeds the cap of 65536"
    )
    with open(f"/proc/{env.pullgate.pid}/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert peak - before < 64 * 1024, "a 100 MB bundle was buffered"
