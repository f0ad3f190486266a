"""Notation (Notary Project) signatures: JWS and COSE envelopes as OCI referrers.

A signature is a referrer of the image with ``artifactType``
``application/vnd.cncf.notary.signature`` whose single layer is the envelope
(``application/jose+json`` or ``application/cose``). Trust material is Notation's own:
a ``trustpolicy.json`` read as is, and a trust store laid out as
``x509/{ca,signingAuthority,tsa}/<name>/*.{pem,crt,cer,der}``.

Verification of one envelope, numbered as the checks run:

1. parse the envelope; its signed payload names the target descriptor;
2. critical headers: every ``crit`` entry is understood (plugins are not supported);
3. integrity: the signature over the signing input verifies with the leaf key, with the
   algorithm the envelope declares (PS256/384/512, ES256/384/512);
4. the target descriptor's digest, size and media type equal the manifest's;
5. authenticity: the x5c chain reaches a trust anchor of the statement's stores of the
   signing scheme's type (``ca`` for ``notary.x509``, ``signingAuthority`` for
   ``notary.x509.signingAuthority``), and the leaf matches ``trustedIdentities``;
6. authentic timestamp: the chain is valid at the authentic signing time
   (``signingAuthority``) or, with no timestamp authority, now (``notary.x509``);
7. expiry: ``io.cncf.notary.expiry`` has not passed.

The statement's level (strict, permissive, audit, skip, with overrides) decides which
of 5-7 are enforced and which only logged, as Notation defines. Revocation is not
checked: that needs the network at verify time, which pullgate never uses; it is logged.
RFC 3161 timestamp countersignatures are neither parsed nor verified (nothing here reads
them): rfc3161-client, installed with sigstore-python, could; using it would be a new
check against the ``tsa`` store, not a move of existing code.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwcrypto import jwa, jwk, jws
from jwcrypto.common import JWException, JWSEHeaderParameter, base64url_decode, base64url_encode

from proxy.oci.errors import OCIError
from proxy.oci.manifest import Descriptor
from proxy.pipeline.gate import ArtifactSource
from proxy.verify.base import (
    TRANSIENT_ERRORS,
    CheckResult,
    Limits,
    PolicyError,
    SignatureError,
    Subject,
    fetch_referrer,
    fetch_signature_blob,
    first_line,
    json_object,
    list_referrers,
)
from proxy.verify.chains import MAX_CHAIN, NOTATION, ChainError, verify_chain

log = logging.getLogger("pullgate.verify.notation")

ARTIFACT_TYPE = "application/vnd.cncf.notary.signature"
JWS = "application/jose+json"
COSE = "application/cose"
PAYLOAD_TYPE = "application/vnd.cncf.notary.payload.v1+json"
SCHEME_X509 = "notary.x509"
SCHEME_AUTHORITY = "notary.x509.signingAuthority"
KNOWN_CRITICAL = {
    "io.cncf.notary.signingScheme",
    "io.cncf.notary.expiry",
    "io.cncf.notary.authenticSigningTime",
}
COSE_ALGORITHMS = {
    -37: "PS256",
    -38: "PS384",
    -39: "PS512",
    -7: "ES256",
    -35: "ES384",
    -36: "ES512",
}
# The Notary Project's key specs: the one algorithm each signs with and, for ECDSA, the
# size of r and of s in the signature.
KEY_SPECS = {
    "2048-bit RSA": ("PS256", 0),
    "3072-bit RSA": ("PS384", 0),
    "4096-bit RSA": ("PS512", 0),
    "secp256r1": ("ES256", 32),
    "secp384r1": ("ES384", 48),
    "secp521r1": ("ES512", 66),
}
CHECKS = ("integrity", "authenticity", "authenticTimestamp", "expiry", "revocation")
LEVELS: dict[str, dict[str, str]] = {
    "strict": dict.fromkeys(CHECKS, "enforce"),
    "permissive": {**dict.fromkeys(CHECKS[:2], "enforce"), **dict.fromkeys(CHECKS[2:], "log")},
    "audit": {**dict.fromkeys(CHECKS[:1], "enforce"), **dict.fromkeys(CHECKS[1:], "log")},
    "skip": dict.fromkeys(CHECKS, "skip"),
}
STORE_TYPES = ("ca", "signingAuthority", "tsa")
MAX_STORE_FILES = 256
MAX_CBOR_DEPTH = 16
UNTRUSTED = "the certificate chain does not reach a certificate in the trust store"


# ---- trust policy and store ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustStatement:
    name: str
    scopes: tuple[str, ...]
    level: str
    actions: Mapping[str, str]
    stores: tuple[tuple[str, str], ...]
    identities: tuple[str, ...]


def load_trust_policy(path: Path) -> tuple[TrustStatement, ...]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot read Notation trust policy {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != "1.0":
        raise PolicyError(f"{path}: expected a Notation trust policy with version 1.0")
    statements = doc.get("trustPolicies")
    if not isinstance(statements, list) or not statements:
        raise PolicyError(f"{path}: trustPolicies must be a non-empty list")
    out = []
    for number, raw in enumerate(statements):
        where = f"{path}: trustPolicies[{number}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where} must be an object")
        scopes = raw.get("registryScopes")
        if not (isinstance(scopes, list) and scopes and all(isinstance(s, str) for s in scopes)):
            raise PolicyError(f"{where}.registryScopes must be a non-empty list")
        if "*" in scopes and len(scopes) > 1:
            raise PolicyError(f"{where}: '*' must be the only registry scope")
        verification = raw.get("signatureVerification")
        if not isinstance(verification, dict) or verification.get("level") not in LEVELS:
            raise PolicyError(f"{where}.signatureVerification.level must be one of {list(LEVELS)}")
        level = str(verification["level"])
        actions = dict(LEVELS[level])
        override = verification.get("override") or {}
        if not isinstance(override, dict):
            raise PolicyError(f"{where}.signatureVerification.override must be an object")
        for check, action in override.items():
            if check not in CHECKS[1:] or action not in ("enforce", "log", "skip"):
                raise PolicyError(f"{where}: bad override {check}: {action}")
            actions[check] = action
        stores = []
        for entry in raw.get("trustStores") or []:
            kind, _, name = str(entry).partition(":")
            if kind not in STORE_TYPES or not name:
                raise PolicyError(f"{where}: trust store {entry!r} must be <type>:<name>")
            stores.append((kind, name))
        identities = raw.get("trustedIdentities") or []
        if not isinstance(identities, list):
            raise PolicyError(f"{where}.trustedIdentities must be a list")
        if level != "skip" and (not stores or not identities):
            raise PolicyError(f"{where}: trustStores and trustedIdentities are required")
        for identity in identities:
            if identity != "*" and not str(identity).startswith("x509.subject:"):
                raise PolicyError(f"{where}: identity {identity!r} must be x509.subject:... or *")
        out.append(
            TrustStatement(
                name=str(raw.get("name", number)),
                scopes=tuple(scopes),
                level=level,
                actions=actions,
                stores=tuple(dict.fromkeys(stores)),
                identities=tuple(map(str, identities)),
            )
        )
    return tuple(out)


def load_store(root: Path, kind: str, name: str) -> list[x509.Certificate]:
    directory = root / "x509" / kind / name
    if not directory.is_dir():
        raise PolicyError(f"trust store {kind}:{name} not found at {directory}")
    certificates: list[x509.Certificate] = []
    for path in filter(Path.is_file, sorted(directory.iterdir())[:MAX_STORE_FILES]):
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                certificates.extend(x509.load_pem_x509_certificates(data))
            else:
                certificates.append(x509.load_der_x509_certificate(data))
        except ValueError as exc:
            raise PolicyError(
                f"trust store {kind}:{name}: {path.name} is not a certificate"
            ) from exc
    if not certificates:
        raise PolicyError(f"trust store {kind}:{name} at {directory} holds no certificates")
    return certificates


# ---- envelopes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    algorithm: str
    signature: bytes
    payload: Mapping[str, Any]
    chain: tuple[x509.Certificate, ...]
    scheme: str
    authentic_signing_time: dt.datetime | None
    expiry: dt.datetime | None
    jws: jws.JWS | None = None
    """A JWS envelope, verified by jwcrypto; COSE is verified over ``signing_input``."""
    signing_input: bytes = b""


def _certificates(items: Any, decode: Callable[[Any], bytes]) -> tuple[x509.Certificate, ...]:
    if not isinstance(items, list | tuple) or not items or len(items) > MAX_CHAIN:
        raise SignatureError("the envelope's certificate chain is missing or too long")
    try:
        chain = tuple(x509.load_der_x509_certificate(decode(item)) for item in items)
        for certificate in chain:  # cryptography parses a name when it is first read
            certificate.subject.rfc4514_string()
        return chain
    except (ValueError, TypeError) as exc:
        raise SignatureError("the envelope's certificate chain does not parse") from exc


def _time(headers: Mapping[Any, Any], what: str) -> dt.datetime | None:
    """The time in header ``io.cncf.notary.<what>``, if set."""
    value: Any = headers.get(f"io.cncf.notary.{what}")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise SignatureError(f"{what} {value[:40]!r} is not an RFC 3339 time") from exc
    if not isinstance(value, dt.datetime):  # else COSE's CBOR tag 1 or 0, decoded by cbor2
        raise SignatureError(f"{what} is not a time")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def cbor_item(data: bytes, what: str) -> Any:
    """Exactly one CBOR item spanning ``data``, decoded by cbor2, or ``SignatureError``.

    Refused: duplicate map keys and indefinite lengths (two readers could disagree on
    what was signed), nesting deeper than ``MAX_CBOR_DEPTH``, trailing bytes. cbor2
    checks lengths against the input before it allocates. Map keys that are arrays or
    maps come back as tuples or frozendicts, so nothing is unhashable.
    """
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        stream, max_depth=MAX_CBOR_DEPTH, allow_indefinite=False, allow_duplicate_keys=False
    )
    try:
        item = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, OverflowError, TypeError, RecursionError) as exc:
        raise SignatureError(f"{what} is not valid CBOR: {str(exc)[:200]}") from exc
    if stream.tell() != len(data):
        raise SignatureError(f"{len(data) - stream.tell()} trailing bytes after {what}")
    return item


def _cose_header(value: Any, what: str) -> Mapping[Any, Any]:
    # RFC 9052 section 3: labels are integers or text. Python would take the CBOR
    # simple value true (or 1.0) for label 1 (alg); Go would not.
    if not isinstance(value, Mapping) or not all(type(k) in (int, str) for k in value):
        raise SignatureError(f"COSE {what} header is not a map with integer or text labels")
    return value


# Flattened JWS JSON, parsed and verified by jwcrypto. The Notary Project headers are
# registered so that jwcrypto accepts a ``crit`` naming them; it refuses any other
# (Notation's "every critical header is understood"). PyJWT reads only the compact form.
_NOTARY_HEADERS = {
    name: JWSEHeaderParameter("Notary Project", True, True, None) for name in KNOWN_CRITICAL
}


def parse_jws(raw: bytes) -> Envelope:
    doc = json_object(raw, "JWS envelope")
    if "signatures" in doc or "payload" not in doc:
        raise SignatureError("JWS envelope is not a flattened JWS with a payload")
    # jwcrypto rebuilds the signing input from the decoded parts; notation-go signs and
    # checks their text. Only canonical unpadded base64url makes the two the same (the
    # vector ca_invalid_sig_env.json differs from a valid one by one "=").
    for part in ("protected", "payload", "signature"):
        text = doc.get(part)
        try:
            canonical = isinstance(text, str) and base64url_encode(base64url_decode(text)) == text
        except (ValueError, TypeError):
            canonical = False
        if not canonical:
            raise SignatureError(f"JWS {part} is not canonical unpadded base64url (integrity)")
    token = jws.JWS(header_registry=_NOTARY_HEADERS)
    try:
        token.deserialize(raw.decode())
        protected = json.loads(token.objects["protected"])
    except (JWException, KeyError, ValueError) as exc:
        raise SignatureError(f"JWS envelope does not parse: {first_line(exc, 120)}") from exc
    header = token.objects.get("header")
    if not isinstance(protected, dict) or not isinstance(header, dict):
        raise SignatureError("JWS headers are missing")
    payload = json_object(token.objects["payload"], "JWS payload")
    if protected.get("cty") != PAYLOAD_TYPE:
        raise SignatureError(f"JWS content type is not {PAYLOAD_TYPE}")
    if "b64" in protected:
        raise SignatureError("JWS with an unencoded payload (b64) is not a Notation envelope")
    return _envelope(
        algorithm=str(protected.get("alg")),
        signature=token.objects["signature"],
        jws=token,
        payload=payload,
        chain=_certificates(header.get("x5c"), lambda c: base64.b64decode(c, validate=True)),
        headers=protected,
        critical=protected.get("crit"),
    )


# COSE_Sign1 stays on cbor2 (decoding) and cryptography (the signature). pycose 1.1
# does not take Notation's envelope as it is: it refuses the tagged message ("Bytes
# cannot be decoded as COSE message"), needs the headers re-wrapped as dicts, and keys
# converted from the certificate by hand; what would remain is the code below.
def parse_cose(raw: bytes) -> Envelope:
    item = cbor_item(raw, "COSE envelope")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != 18:
            raise SignatureError(f"COSE envelope has tag {item.tag}, not COSE_Sign1 (18)")
        item = item.value
    # cbor2 decodes the contents of a tag immutably: arrays as tuples, maps as frozendicts.
    if not isinstance(item, list | tuple) or len(item) != 4:
        raise SignatureError("COSE_Sign1 must be an array of 4 items")
    protected_raw, unprotected_raw, payload_raw, signature = item
    if not all(isinstance(x, bytes) for x in (protected_raw, payload_raw, signature)):
        raise SignatureError("COSE_Sign1 fields have the wrong types")
    protected = _cose_header(cbor_item(protected_raw, "COSE protected header"), "protected")
    unprotected = _cose_header(unprotected_raw, "unprotected")
    payload = json_object(payload_raw, "COSE payload")
    if protected.get(3) != PAYLOAD_TYPE:
        raise SignatureError(f"COSE content type is not {PAYLOAD_TYPE}")
    algorithm = protected.get(1)
    name = COSE_ALGORITHMS.get(algorithm) if type(algorithm) is int else None
    if name is None:  # an integer label (RFC 9053), never "ES256" as text
        raise SignatureError(f"COSE algorithm {str(algorithm)[:20]!r} is not a Notary algorithm")
    return _envelope(
        algorithm=name,
        # RFC 9052 section 4.4: Sig_structure = ["Signature1", protected, aad, payload]
        signing_input=cbor2.dumps(["Signature1", protected_raw, b"", payload_raw]),
        signature=signature,
        payload=payload,
        chain=_certificates(unprotected.get(33), lambda item: item),  # bstrs, not bytes(n)
        headers=protected,
        critical=protected.get(2),
    )


def _envelope(*, headers: Mapping[Any, Any], critical: Any, **fields: Any) -> Envelope:
    """An ``Envelope`` with the Notary Project headers, named alike in JWS and COSE, once
    the critical ones are known to be those Notation defines."""
    critical = critical or []
    names = tuple(map(str, critical)) if isinstance(critical, list | tuple) else ("<invalid>",)
    _time(headers, "signingTime")  # refused if malformed
    envelope = Envelope(
        **fields,
        scheme=str(headers.get("io.cncf.notary.signingScheme")),
        authentic_signing_time=_time(headers, "authenticSigningTime"),
        expiry=_time(headers, "expiry"),
    )
    # 2. Critical headers, before integrity: jwcrypto refuses an unknown one as a bad
    #    signature, and no verification plugin could understand any other.
    if "io.cncf.notary.signingScheme" not in names:
        raise SignatureError("signingScheme is not marked critical")
    if envelope.expiry is not None and "io.cncf.notary.expiry" not in names:
        raise SignatureError("expiry is not marked critical")
    if envelope.scheme == SCHEME_AUTHORITY and "io.cncf.notary.authenticSigningTime" not in names:
        raise SignatureError("signingAuthority's authenticSigningTime is not marked critical")
    if extra := [name for name in names if name not in KNOWN_CRITICAL]:
        raise SignatureError(
            f"unsupported critical headers {extra[:5]} (verification plugins are not supported)"
        )
    if envelope.scheme not in (SCHEME_X509, SCHEME_AUTHORITY):
        raise SignatureError(f"unknown signing scheme {envelope.scheme[:40]!r}")
    return envelope


def parse_envelope(media_type: str, raw: bytes) -> Envelope:
    if media_type == JWS:
        return parse_jws(raw)
    if media_type == COSE:
        return parse_cose(raw)
    raise SignatureError(f"unsupported envelope media type {media_type[:80]}")


def _verify_signature(envelope: Envelope) -> None:
    """Integrity, by jwcrypto for both envelopes: COSE_Sign1 signs with the JOSE
    algorithms and their encodings (RFC 9053 section 2.1: ECDSA as r || s; RFC 8230:
    PSS with the hash's length as salt), so its JWA verifies the Sig_structure too.

    The algorithm and the signature's length must fit the leaf's key first, under the
    Notary Project's key specs, as notation-go checks. ECDSA's r || s is exactly two
    curve-size integers: jwcrypto splits any length in half, so a padded or odd-length
    encoding of a valid signature would verify as another envelope."""
    try:
        key = envelope.chain[0].public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError("the signing certificate's public key cannot be loaded") from exc
    algorithm, signature = envelope.algorithm, envelope.signature
    if algorithm not in COSE_ALGORITHMS.values():
        raise SignatureError(f"unsupported signature algorithm {algorithm[:20]}")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise SignatureError(f"{algorithm} needs an RSA or EC key")
    name = f"{key.key_size}-bit RSA" if isinstance(key, rsa.RSAPublicKey) else key.curve.name
    wanted, size = KEY_SPECS.get(name, ("", 0))
    problem = ""
    if not wanted:
        problem = f"a {name[:40]} key is not a Notary Project key spec ({', '.join(KEY_SPECS)})"
    elif algorithm != wanted:
        problem = f"{algorithm} is not the algorithm of a {name} key ({wanted})"
    elif size and len(signature) != 2 * size:
        problem = (
            f"an {algorithm} signature of {len(signature)} bytes, not {2 * size} bytes (r || s)"
        )
    if problem:
        raise SignatureError(f"the envelope's signature does not verify (integrity): {problem}")
    try:
        public = jwk.JWK.from_pyca(key)
        if envelope.jws is not None:
            envelope.jws.verify(public, alg=algorithm)
        else:
            signing: Any = jwa.JWA.signing_alg(algorithm)  # typed without verify()
            signing.verify(public, envelope.signing_input, envelope.signature)
    except (JWException, InvalidSignature, ValueError, TypeError) as exc:
        raise SignatureError("the envelope's signature does not verify (integrity)") from exc


_DN_OIDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "C": NameOID.COUNTRY_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
}


def _subject_matches(identity: str, subject: x509.Name) -> bool:
    """Whether ``subject`` has exactly the attributes of ``identity``, ``*`` or Notation's
    ``x509.subject:C=US, ST=WA, ...`` (``x509.Name.from_rfc4514_string`` refuses the
    spaces after the commas). An attribute type not listed in ``_DN_OIDS`` matches none."""
    if identity == "*":
        return True
    parts = [""]
    # Split at commas; a backslash escapes the next character (a comma too).
    for token in re.split(r"(\\.?|,)", identity.removeprefix("x509.subject:"), flags=re.DOTALL):
        if token == ",":
            parts.append("")
        else:
            parts[-1] += token.removeprefix("\\")
    pairs = [part.partition("=") for part in parts]
    if any(not sep or key.strip() not in _DN_OIDS for key, sep, _ in pairs):
        return False
    wanted = {(_DN_OIDS[key.strip()].dotted_string, value.strip()) for key, _, value in pairs}
    return wanted == {(attr.oid.dotted_string, str(attr.value)) for attr in subject}


# ---- the verifier ----------------------------------------------------------------------


class NotationVerifier:
    def __init__(
        self,
        *,
        label: str,
        statements: tuple[TrustStatement, ...],
        stores: Mapping[tuple[str, str], list[x509.Certificate]],
        clock: Any = None,
    ) -> None:
        self._label = label
        self._statements = statements
        self._stores = dict(stores)
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def describe(self) -> str:
        return self._label

    @property
    def authenticates(self) -> bool:
        """Whether every trust statement enforces integrity and authenticity, so that a
        verified signature is a trusted signer's (not at audit or skip)."""
        return all(
            s.actions["integrity"] == "enforce" and s.actions["authenticity"] == "enforce"
            for s in self._statements
        )

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        # The statement naming ``registry/repository`` exactly, else the ``*`` one.
        scopes = (subject.name, "*")
        statement = next(
            (s for scope in scopes for s in self._statements if scope in s.scopes), None
        )
        if statement is None:
            return CheckResult(False, f"no Notation trust policy statement covers {subject.name}")
        if statement.level == "skip":
            return CheckResult(True, f"Notation statement {statement.name!r} skips verification")
        try:
            candidates = await list_referrers(source, subject, ARTIFACT_TYPE)
        except SignatureError as exc:
            return CheckResult(False, f"cannot list Notation signatures: {exc}")
        if not candidates:
            return CheckResult(False, "no Notation signatures found")
        reasons: list[str] = []
        for descriptor in candidates[: limits.max_signatures]:
            reason = await self._check_referrer(subject, source, limits, descriptor, statement)
            if reason is None:
                return CheckResult(
                    True, f"Notation signature {descriptor.digest} verified ({statement.name})"
                )
            reasons.append(reason)
        shown = "; ".join(sorted(set(reasons)))[:600]
        return CheckResult(False, f"no Notation signature verified: {shown}")

    async def _check_referrer(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        listed: Descriptor,
        statement: TrustStatement,
    ) -> str | None:
        try:
            manifest = await fetch_referrer(source, listed, subject, limits)
        except TRANSIENT_ERRORS:
            raise
        except (OCIError, SignatureError) as exc:  # an OCIError's str() is its message
            return f"signature manifest {listed.digest}: {exc}"
        if manifest.artifact_type not in (ARTIFACT_TYPE, None) and (
            manifest.config is None or manifest.config.media_type != ARTIFACT_TYPE
        ):
            return "referrer is not a Notation signature"
        if len(manifest.layers) != 1:
            return "a Notation signature manifest must have exactly one layer"
        layer = manifest.layers[0]
        try:
            raw = await fetch_signature_blob(source, layer, limits, what="envelope")
        except SignatureError as exc:
            return str(exc)
        return await asyncio.to_thread(
            self.check_envelope, layer.media_type, raw, subject, statement
        )

    def check_envelope(
        self, media_type: str, raw: bytes, subject: Subject, statement: TrustStatement
    ) -> str | None:
        """None if the envelope verifies for ``subject`` under ``statement``; else why not."""
        try:
            envelope = parse_envelope(media_type, raw)
            # 3. Integrity, always enforced.
            _verify_signature(envelope)
        except SignatureError as exc:
            return str(exc)
        now = self._clock()
        # 4. The signed target must be exactly this manifest.
        target = envelope.payload.get("targetArtifact")
        if not isinstance(target, dict):
            return "payload has no targetArtifact"
        for field, name, value in (
            ("digest", "digest", str(subject.digest)),
            ("size", "size", subject.size),
            ("mediaType", "media type", subject.media_type),
        ):
            if target.get(field) != value:
                signed = str(target.get(field))[:80]
                return f"signature target {name} {signed} does not match {value}"
        # 5./6. Authenticity and authentic time.
        kind = "ca" if envelope.scheme == SCHEME_X509 else "signingAuthority"
        stores = [store for store in statement.stores if store[0] == kind]
        anchors = [cert for store in stores for cert in self._stores.get(store, [])]
        at = envelope.authentic_signing_time if kind == "signingAuthority" else now
        if at is None:
            return "signingAuthority signature has no authenticSigningTime"
        problems = _chain_problems(envelope.chain, anchors, at)
        signer = envelope.chain[0].subject
        if not any(_subject_matches(i, signer) for i in statement.identities):
            untrusted = f"signer {signer.rfc4514_string()[:120]} is not a trusted identity"
            problems.append(("authenticity", untrusted))
        # 7. Expiry.
        if envelope.expiry is not None and envelope.expiry <= now:
            expired = f"signature expired at {envelope.expiry:%Y-%m-%dT%H:%M:%SZ}"
            problems.append(("expiry", expired))
        # The statement's level decides which failed checks refuse and which only log.
        for check, problem in problems:
            if statement.actions[check] == "enforce":
                return problem
            log.warning("notation: %s (%s is set to %s)", problem, check, statement.actions[check])
        if statement.actions["revocation"] != "skip":
            log.debug("notation: revocation not checked (offline verification)")
        return None


def _chain_problems(
    chain: tuple[x509.Certificate, ...], anchors: list[x509.Certificate], at: dt.datetime
) -> list[tuple[str, str]]:
    """The (check, reason) pairs the x5c chain fails at ``at``: ``authenticTimestamp``
    for a certificate outside its validity, ``authenticity`` for the path.

    A time check that is only logged must not waive authenticity: a path refused at
    ``at`` for a certificate's validity is built again at the latest notBefore (refused
    if the validity periods do not overlap)."""
    problems: list[tuple[str, str]] = []
    start = max(c.not_valid_before_utc for c in chain)
    for when in (at, start):
        try:
            if problems and start > min(c.not_valid_after_utc for c in chain):
                raise ChainError("the certificates' validity periods do not overlap")
            verify_chain(chain[0], chain[1:], anchors=anchors, at=when, profile=NOTATION)
            return problems
        except ChainError as exc:
            if problems or (cert := exc.outside_validity) is None:
                reason = f"the certificate chain does not verify to the trust store: {exc}"
                return [*problems, ("authenticity", reason if exc.reaches_anchor else UNTRUSTED)]
            valid = f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
            name = cert.subject.rfc4514_string()[:120]
            problem = f"certificate {name} is not valid at {at:%Y-%m-%dT%H:%M:%SZ} (valid {valid})"
            problems.append(("authenticTimestamp", problem))
    return problems


def notation_verifier_from_spec(spec: Mapping[str, Any], *, base_dir: Path) -> NotationVerifier:
    if unknown := set(spec) - {"trustPolicy", "trustStore"}:
        raise PolicyError(f"unknown keys {sorted(unknown)}; known: trustPolicy, trustStore")
    policy_path, store_path = spec.get("trustPolicy"), spec.get("trustStore")
    if not isinstance(policy_path, str) or not isinstance(store_path, str):
        raise PolicyError("trustPolicy and trustStore paths are required")
    statements = load_trust_policy(base_dir / policy_path)
    named = dict.fromkeys(store for statement in statements for store in statement.stores)
    stores = {store: load_store(base_dir / store_path, *store) for store in named}
    return NotationVerifier(
        label=f"notation trustPolicy {policy_path}", statements=statements, stores=stores
    )
