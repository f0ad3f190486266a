"""X.509 certificate paths, for every verifier: one helper on cryptography's path builder.

Notation x5c chains, OMS signing certificates and legacy cosign (Fulcio) certificates
are all checked here, by ``verify_chain``. Bundles that sigstore-python verifies go
through its own path builder (the same cryptography code) and not through this file.

cryptography's ``PolicyBuilder`` builds a path from the leaf to a trust anchor through
the untrusted intermediates and enforces, for every certificate on it:

* signatures, names and validity at the signing time given;
* ``basicConstraints``: every issuing certificate must assert ``cA`` (a leaf cannot act
  as an intermediate: cosign CVE-2022-36056, Notation CVE-2023-33958), and
  ``pathLenConstraint`` is honoured;
* RSA keys of 2048 bits or more, the WebPKI signature algorithms, no unknown critical
  extension.

Key usage and extended key usage differ per format, so each format has a
``ChainProfile``: extension policies whose validators state the format's rules.
Two rules of the Notary Project signature specification are not expressible as
extension policies and are deliberately not enforced: the x5c list must be ordered and
hold no unrelated certificate (the path is built from the anchors instead, which is
what authenticity rests on), and its last certificate must be a root.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from proxy.verify.base import SignatureError

MAX_CHAIN = 10
"""Certificates a signature may present (leaf included), and the longest path built."""

CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE


class ChainError(SignatureError):
    """A certificate path that does not verify; the reason is cryptography's own.

    ``outside_validity`` is the first presented certificate (leaf first) that is not
    valid at the signing time, if that is why: Notation reports it under its
    ``authenticTimestamp`` check rather than ``authenticity``.
    """

    def __init__(self, reason: str, *, outside_validity: x509.Certificate | None = None) -> None:
        super().__init__(reason)
        self.outside_validity = outside_validity


@dataclass(frozen=True, slots=True)
class ChainProfile:
    """What one signature format demands of a path, beyond RFC 5280."""

    name: str
    ca_policy: ExtensionPolicy
    ee_policy: ExtensionPolicy


Validator = Callable[[Any, x509.Certificate, Any], None]


# ---- the rules --------------------------------------------------------------------------
# Validators raise ValueError with a reason; cryptography reports it as
# "Python extension validator failed: ValueError: <reason>".


def _ca_key_usage(required: bool) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
        if usage is None:
            if required:
                raise ValueError("CA certificate has no keyUsage extension")
            return
        if not usage.key_cert_sign:
            raise ValueError("CA certificate keyUsage does not allow keyCertSign")

    return check


def _ca_extended_key_usage(
    _policy: Any, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    # EKU nesting, as Go's x509 (cosign, Notation) applies it: a CA that restricts its
    # purposes must include code signing to vouch for a code-signing certificate.
    if eku is not None and CODE_SIGNING not in eku and ANY_EKU not in eku:
        raise ValueError("CA certificate extended key usage does not include code signing")


def _leaf_not_ca(
    _policy: Any, _cert: x509.Certificate, constraints: x509.BasicConstraints | None
) -> None:
    if constraints is not None and constraints.ca:
        raise ValueError("signing certificate basicConstraints asserts cA")


def _leaf_key_usage(*, required: bool, forbidden: tuple[str, ...] = ()) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
        if usage is None:
            if required:
                raise ValueError("signing certificate has no keyUsage extension")
            return
        if not usage.digital_signature:
            raise ValueError("signing certificate keyUsage does not allow digitalSignature")
        for bit in forbidden:
            if getattr(usage, bit):
                raise ValueError(f"signing certificate keyUsage must not allow {bit}")

    return check


def _leaf_extended_key_usage(
    *, required: bool, forbidden: tuple[x509.ObjectIdentifier, ...] = ()
) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        if eku is None:
            if required:
                raise ValueError("signing certificate is not for code signing (no EKU)")
            return
        if CODE_SIGNING not in eku:
            raise ValueError("signing certificate is not for code signing")
        bad = [oid.dotted_string for oid in eku if oid in forbidden]
        if bad:
            raise ValueError(f"signing certificate extended key usage must not list {bad[0]}")

    return check


def _ca_policy(*, key_usage_required: bool) -> ExtensionPolicy:
    # cryptography itself refuses a CA policy without basicConstraints; cA and the path
    # length are enforced by the path builder whatever the validator.
    criticality = Criticality.CRITICAL if key_usage_required else Criticality.AGNOSTIC
    return (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(x509.BasicConstraints, Criticality.CRITICAL, None)
        .may_be_present(x509.KeyUsage, criticality, _ca_key_usage(key_usage_required))
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_extended_key_usage)
    )


def _ee_policy(
    *, basic_constraints: Validator | None, key_usage: Validator, eku: Validator
) -> ExtensionPolicy:
    # Signing certificates need not name a host nor their issuer's key: no
    # subjectAltName or authorityKeyIdentifier requirement (identities are matched by
    # each verifier; Notation honours basicConstraints, keyUsage and EKU only).
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
        .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, basic_constraints)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, key_usage)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, eku)
    )


SIGSTORE = ChainProfile(
    # Fulcio leaves: keyUsage digitalSignature required; EKU code signing when an EKU is
    # present (cosign's private-PKI certificates may have none: Go's x509, which cosign
    # uses, then allows any purpose). Private PKI CAs often omit keyUsage (Go accepts
    # that too); when present it must allow keyCertSign.
    "sigstore",
    ca_policy=_ca_policy(key_usage_required=False),
    ee_policy=_ee_policy(
        basic_constraints=_leaf_not_ca,
        key_usage=_leaf_key_usage(required=True),
        eku=_leaf_extended_key_usage(required=False),
    ),
)

NOTATION = ChainProfile(
    # Notary Project signature specification, "Certificate Requirements": CA certificates
    # carry a critical keyUsage with keyCertSign; the signing certificate has a critical
    # keyUsage with digitalSignature and none of the listed bits, is not a CA, and its
    # EKU, if present, lists none of anyEKU, serverAuth, clientAuth, emailProtection and
    # timeStamping. Stricter than the specification (as pullgate always was): an EKU
    # that is present must list code signing.
    "notation",
    ca_policy=_ca_policy(key_usage_required=True),
    ee_policy=_ee_policy(
        basic_constraints=_leaf_not_ca,
        key_usage=_leaf_key_usage(
            required=True,
            forbidden=(
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
                # encipherOnly and decipherOnly mean something only with keyAgreement,
                # which is refused above (cryptography will not even read them without).
            ),
        ),
        eku=_leaf_extended_key_usage(
            required=False,
            forbidden=(
                ANY_EKU,
                ExtendedKeyUsageOID.SERVER_AUTH,
                ExtendedKeyUsageOID.CLIENT_AUTH,
                ExtendedKeyUsageOID.EMAIL_PROTECTION,
                ExtendedKeyUsageOID.TIME_STAMPING,
            ),
        ),
    ),
)


def _oms_leaf_can_sign(_policy: Any, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    # model_signing accepts a signing certificate whose keyUsage allows digitalSignature
    # or, without keyUsage, whose EKU lists code signing; either must then say so.
    if usage is not None:
        _leaf_key_usage(required=True)(_policy, cert, usage)
        return
    try:
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        raise ValueError("signing certificate has neither keyUsage nor EKU") from None


OMS = ChainProfile(
    # OMS (model_signing) certificate signing. model-transparency's own signing
    # certificate asserts cA:TRUE with keyUsage digitalSignature only; as an end entity
    # that is harmless, so the leaf's basicConstraints is not checked. Issuing
    # certificates still must be CAs.
    "oms",
    ca_policy=_ca_policy(key_usage_required=False),
    ee_policy=_ee_policy(
        basic_constraints=None,
        key_usage=_oms_leaf_can_sign,
        eku=_leaf_extended_key_usage(required=False),
    ),
)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    *,
    anchors: Sequence[x509.Certificate],
    at: dt.datetime,
    profile: ChainProfile,
) -> list[x509.Certificate]:
    """The verified path from ``leaf`` to one of ``anchors`` at time ``at``, leaf first.

    ``intermediates`` are untrusted (they come with the signature) and may include the
    root; ``anchors`` are trusted as given. Raises ``ChainError`` with cryptography's
    reason when no path satisfies RFC 5280 and ``profile``.
    """
    # 1. Bounds: the signature chooses how many certificates it presents.
    if len(intermediates) + 1 > MAX_CHAIN:
        raise ChainError(f"certificate chain is longer than {MAX_CHAIN} certificates")
    if not anchors:
        raise ChainError("no trust anchors are configured")
    # 2. The path: signatures, basicConstraints (cA, pathLen), validity at ``at``,
    #    key usages per the profile, no unknown critical extension.
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(at)
        .max_chain_depth(MAX_CHAIN)
        .extension_policies(ca_policy=profile.ca_policy, ee_policy=profile.ee_policy)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(leaf, list(intermediates)).chain)
    except (VerificationError, x509.UnsupportedGeneralNameType, ValueError) as exc:
        # 3. Say whether a presented certificate was outside its validity at ``at``.
        expired = next(
            (
                cert
                for cert in (leaf, *intermediates)
                if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc
            ),
            None,
        )
        raise ChainError(str(exc), outside_validity=expired) from exc
