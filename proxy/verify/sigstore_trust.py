"""A sigstore ``trusted_root.json``, loaded once from a file (never fetched).

The file is parsed once, by sigstore-python (``sigstore.models.TrustedRoot`` over
``sigstore_models``): certificate bundles are verified by sigstore-python with that
object. The legacy cosign verifier (``.sig`` images with a Rekor SET in an annotation)
and public-key bundles need what sigstore-python keeps to itself, taken here from the
same parsed object as sigstore-python's own types: the Fulcio certificate authorities
(``sigstore._internal.trust.CertificateAuthority``) and, per Rekor log, its log ID,
validity window and a one-key ``sigstore._internal.trust.Keyring``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.x509.oid import ObjectIdentifier
from sigstore._internal.trust import CertificateAuthority, Key, Keyring, RekorKeyring
from sigstore.errors import MetadataError, VerificationError
from sigstore.models import TrustedRoot
from sigstore_models.common.v1 import TimeRange
from sigstore_models.trustroot.v1 import TrustedRoot as TrustedRootDocument

from proxy.verify.base import PolicyError, SignatureError, first_line
from proxy.verify.chains import SIGSTORE, ChainError, verify_chain
from proxy.verify.keys import KeyFormatError, VerificationKey, certificate_key

# Fulcio's OIDC issuer extensions: v1 holds the raw string, v2 a DER UTF8String.
OID_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_OTHERNAME_USERNAME = ObjectIdentifier("1.3.6.1.4.1.57264.1.7")
MAX_REGEXP_LENGTH = 1024

MAX_TRUSTED_ROOT_BYTES = 4 * 1024 * 1024


def valid_at(window: TimeRange | None, when: datetime) -> bool:
    """Whether ``when`` is inside a trusted root's ``validFor`` window (none: always).

    sigstore-python only asks whether a window holds *now* (``is_timerange_valid``);
    pullgate asks it of the signing or integration time.
    """
    if window is None:
        return True
    return window.start <= when and (window.end is None or when <= window.end)


@dataclass(frozen=True, slots=True)
class LogKey:
    """A transparency (Rekor) log: its ID, its key as sigstore-python holds it, its window."""

    log_id: bytes
    keyring: RekorKeyring
    valid_for: TimeRange | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SigstoreTrustRoot:
    """The trusted root: sigstore-python's object, and what the legacy path reads of it."""

    path: Path
    sigstore: Any
    """The ``sigstore.models.TrustedRoot`` every sigstore-python verifier is built on."""
    certificate_authorities: tuple[CertificateAuthority, ...]
    tlogs: tuple[LogKey, ...]

    def tlog(self, log_id: bytes) -> LogKey | None:
        """The Rekor log whose log ID is ``log_id``."""
        return next((log for log in self.tlogs if log.log_id == log_id), None)


def _log_keys(instances: Any) -> tuple[LogKey, ...]:
    out: list[LogKey] = []
    for instance in instances or ():
        try:
            key = Key(instance.public_key)
        except (VerificationError, ValueError):
            continue  # a key type sigstore-python does not verify with (it skips them too)
        out.append(
            LogKey(
                log_id=bytes(instance.log_id.key_id) or key.key_id,
                keyring=RekorKeyring(Keyring([instance.public_key])),
                valid_for=instance.public_key.valid_for,
            )
        )
    return tuple(out)


def load_trusted_root(path: Path) -> SigstoreTrustRoot:
    """Load and check a ``trusted_root.json``; any problem is a ``PolicyError``."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_TRUSTED_ROOT_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read trusted root {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_TRUSTED_ROOT_BYTES:
        raise PolicyError(f"trusted root {path} is larger than {MAX_TRUSTED_ROOT_BYTES} bytes")
    try:
        # What TrustedRoot.from_file does, on the bytes already read (and size-capped).
        document = TrustedRootDocument.from_json(raw)
        root = SigstoreTrustRoot(
            path=path,
            sigstore=TrustedRoot(document),
            certificate_authorities=tuple(
                CertificateAuthority(authority) for authority in document.certificate_authorities
            ),
            tlogs=_log_keys(document.tlogs),
        )
    except Exception as exc:  # pydantic, sigstore and cryptography errors: all "bad file"
        raise PolicyError(f"trusted root {path} is malformed: {first_line(exc)}") from exc
    if not root.certificate_authorities and not root.tlogs:
        raise PolicyError(f"trusted root {path} has neither certificate authorities nor tlogs")
    return root


# ---- identities and certificates ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """A string matched exactly, or by regular expression when written ``regexp:<re>``.

    Regular expressions search (like Go's ``MatchString``, which cosign uses): anchor
    them with ``^`` and ``$`` to match a whole value.
    """

    text: str
    pattern: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: Any, *, where: str) -> Matcher:
        if not isinstance(text, str) or not text:
            raise PolicyError(f"{where} must be a non-empty string")
        if not text.startswith("regexp:"):
            return cls(text, None)
        expression = text[len("regexp:") :]
        if not expression or len(expression) > MAX_REGEXP_LENGTH:
            raise PolicyError(f"{where}: empty or over-long regular expression")
        try:
            return cls(text, re.compile(expression))
        except re.error as exc:
            raise PolicyError(f"{where}: bad regular expression: {exc}") from exc

    def matches(self, value: str) -> bool:
        if self.pattern is None:
            return value == self.text
        return self.pattern.search(value) is not None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class KeylessIdentity:
    """Who a keyless certificate must name: its SAN, and the OIDC issuer extension.

    ``issuer`` None (only for private PKI certificates, never from a policy file
    without saying so) skips the issuer check.
    """

    subject: Matcher
    issuer: Matcher | None

    def describe(self) -> str:
        issuer = f"issuer={self.issuer} " if self.issuer is not None else ""
        return f"{issuer}subject={self.subject}"


def _der_utf8(raw: bytes) -> str | None:
    """A DER UTF8String (Fulcio's v2 extensions), decoded by cryptography's ASN.1."""
    try:
        return asn1.decode_der(str, raw)
    except ValueError:
        return None


def certificate_issuer(cert: x509.Certificate) -> str | None:
    """The OIDC issuer Fulcio recorded in ``cert`` (v2 extension preferred), if any."""
    for oid, der in ((OID_ISSUER_V2, True), (OID_ISSUER_V1, False)):
        try:
            value = cert.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            continue
        if isinstance(value, x509.UnrecognizedExtension):
            try:
                return asn1.decode_der(str, value.value) if der else value.value.decode()
            except ValueError:  # not a (DER) UTF-8 string: the v1 extension, then none
                continue
    return None


def certificate_identities(cert: x509.Certificate) -> list[str]:
    """Every SAN value an identity policy may match: emails, URIs, DNS names, usernames."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    usernames = [
        _der_utf8(other.value)
        for other in san.get_values_for_type(x509.OtherName)
        if other.type_id == OID_OTHERNAME_USERNAME
    ]
    return [
        *san.get_values_for_type(x509.RFC822Name),
        *san.get_values_for_type(x509.UniformResourceIdentifier),
        *san.get_values_for_type(x509.DNSName),
        *(name for name in usernames if name is not None),
    ]


def check_identity(cert: x509.Certificate, identity: KeylessIdentity) -> None:
    """Refuse a certificate whose SAN or OIDC issuer does not match ``identity``.

    Also the ``VerificationPolicy`` of sigstore-python's ``Verifier`` (``bundle.py``), so
    one check serves both paths. sigstore-python's ``Identity`` policy cannot: it matches
    exactly (pullgate also matches ``regexp:``, as cosign does), skips DNS SANs and reads
    only the v1 issuer extension. The values come from cryptography's SAN parsing and
    its DER decoder; nothing is parsed by hand.
    """
    names = certificate_identities(cert)
    if not any(identity.subject.matches(name) for name in names):
        shown = ", ".join(names[:3]) or "none"
        raise SignatureError(
            f"certificate identity ({shown[:200]}) does not match {identity.subject}"
        )
    if identity.issuer is not None:
        issuer = certificate_issuer(cert)
        if issuer is None:
            raise SignatureError("certificate has no OIDC issuer extension")
        if not identity.issuer.matches(issuer):
            raise SignatureError(
                f"certificate issuer {issuer[:200]!r} does not match {identity.issuer}"
            )


def verify_certificate_chain(
    trust: SigstoreTrustRoot,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    *,
    at: datetime,
) -> VerificationKey:
    """Chain ``leaf`` to a trusted-root CA, every certificate valid at ``at``.

    The CA certificates of the trusted root (intermediates included) are trust anchors,
    as in sigstore-python; ``intermediates`` come from the signature and are untrusted.
    The path rules (CA bits, path length, Fulcio key usages) are ``chains.SIGSTORE``;
    the CA must also be inside its own ``validFor`` window at ``at``.
    """
    try:
        anchors = trust.sigstore.get_fulcio_certs()  # every CA certificate, expired ones too
    except MetadataError as exc:
        raise SignatureError("the trusted root has no certificate authorities") from exc
    try:
        chain = verify_chain(leaf, intermediates, anchors=anchors, at=at, profile=SIGSTORE)
    except ChainError as exc:
        raise SignatureError(
            f"certificate does not chain to a trusted CA at {at:%Y-%m-%dT%H:%M:%SZ}: {exc}"
        ) from exc
    anchor = chain[-1]
    if not any(
        anchor in ca.certificates(allow_expired=True) and valid_at(ca._inner.valid_for, at)
        for ca in trust.certificate_authorities
    ):
        raise SignatureError("the certificate authority was not valid at signing time")
    try:
        return certificate_key(leaf)
    except KeyFormatError as exc:
        raise SignatureError(str(exc)) from exc
