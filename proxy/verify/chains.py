"""X.509 certificate paths for every verifier: one helper on cryptography's path builder.

Notation x5c chains, OMS signing certificates and legacy cosign (Fulcio) certificates
are checked by ``verify_chain``; bundles that sigstore-python verifies go through its
own use of the same cryptography path builder. ``PolicyBuilder`` builds a path from the
leaf through the untrusted intermediates to a trust anchor and enforces, on every
certificate: signatures, names, validity at the signing time; ``basicConstraints``
(every issuer must assert cA, so a leaf cannot act as an intermediate: cosign
CVE-2022-36056, Notation CVE-2023-33958) and ``pathLenConstraint``; RSA of 2048 bits
or more; no unknown critical extension.

Key usage and EKU rules differ per format: each ``ChainProfile`` states them as
extension-policy validators. Not enforced, because the path is built from the anchors
(what authenticity rests on) rather than read from the signature: Notation's rules that
x5c be ordered, hold no unrelated certificate and end in a root.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
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

Validator = Callable[[Any, x509.Certificate, Any], None]
AGNOSTIC, CRITICAL = Criticality.AGNOSTIC, Criticality.CRITICAL


class ChainError(SignatureError):
    """A certificate path that does not verify; the reason is cryptography's own.

    ``outside_validity``: the first presented certificate not valid at the signing time,
    if any (Notation reports that under ``authenticTimestamp``, not ``authenticity``).
    ``reaches_anchor``: whether a presented certificate is an anchor or was signed by
    one, i.e. whether a rule failed rather than the trust itself.
    """

    def __init__(
        self,
        reason: str,
        *,
        outside_validity: x509.Certificate | None = None,
        reaches_anchor: bool = True,
    ) -> None:
        super().__init__(reason)
        self.outside_validity = outside_validity
        self.reaches_anchor = reaches_anchor


@dataclass(frozen=True, slots=True)
class ChainProfile:
    """What one signature format demands of a path, beyond RFC 5280."""

    name: str
    ca_policy: ExtensionPolicy
    ee_policy: ExtensionPolicy


# ---- rules (a validator raises ValueError; cryptography reports its message) ---------


def _ca_key_usage(required: bool) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
        if usage is None and required:
            raise ValueError("CA certificate has no keyUsage extension")
        if usage is not None and not usage.key_cert_sign:
            raise ValueError("CA certificate keyUsage does not allow keyCertSign")

    return check


def _ca_eku(_policy: Any, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    # EKU nesting, as Go's x509 (cosign, Notation) applies it: a CA that restricts its
    # purposes must include code signing to vouch for a code-signing certificate.
    if eku is not None and EKU.CODE_SIGNING not in eku and EKU.ANY_EXTENDED_KEY_USAGE not in eku:
        raise ValueError("CA certificate extended key usage does not include code signing")


def _leaf_not_ca(_policy: Any, _cert: x509.Certificate, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("signing certificate basicConstraints asserts cA")


def _leaf_key_usage(*, forbidden: tuple[str, ...] = ()) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
        if usage is None:
            raise ValueError("signing certificate has no keyUsage extension")
        if not usage.digital_signature:
            raise ValueError("signing certificate keyUsage does not allow digitalSignature")
        for bit in forbidden:
            if getattr(usage, bit):
                raise ValueError(f"signing certificate keyUsage must not allow {bit}")

    return check


def _leaf_eku(forbidden: tuple[x509.ObjectIdentifier, ...]) -> Validator:
    def check(_policy: Any, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        if eku is not None and EKU.CODE_SIGNING not in eku:
            raise ValueError("signing certificate is not for code signing")
        bad = [oid.dotted_string for oid in eku or () if oid in forbidden]
        if bad:
            raise ValueError(f"signing certificate extended key usage must not list {bad[0]}")

    return check


def _oms_leaf_usage(policy: Any, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    # model_signing accepts a signing certificate whose keyUsage allows digitalSignature
    # or, without keyUsage, whose EKU lists code signing (checked by the EKU rule).
    if usage is not None:
        _leaf_key_usage()(policy, cert, usage)
        return
    if not any(isinstance(ext.value, x509.ExtendedKeyUsage) for ext in cert.extensions):
        raise ValueError("signing certificate has neither keyUsage nor EKU")


def _profile(
    name: str,
    *,
    ca_key_usage_required: bool = False,
    leaf_basic_constraints: Validator | None = _leaf_not_ca,
    leaf_key_usage: Validator | None = None,
    leaf_eku_forbidden: tuple[x509.ObjectIdentifier, ...] = (),
) -> ChainProfile:
    # The defaults are Fulcio's rules (``SIGSTORE``); other formats say how they differ.
    # cryptography refuses a CA policy without basicConstraints, and checks cA and the
    # path length whatever the validator. Signing certificates need not name a host or
    # their issuer's key: no subjectAltName or authorityKeyIdentifier requirement.
    ca = (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(x509.BasicConstraints, CRITICAL, None)
        .may_be_present(
            x509.KeyUsage,
            CRITICAL if ca_key_usage_required else AGNOSTIC,
            _ca_key_usage(ca_key_usage_required),
        )
        .may_be_present(x509.ExtendedKeyUsage, AGNOSTIC, _ca_eku)
    )
    ee = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, AGNOSTIC, None)
        .may_be_present(x509.BasicConstraints, AGNOSTIC, leaf_basic_constraints)
        .may_be_present(x509.KeyUsage, AGNOSTIC, leaf_key_usage or _leaf_key_usage())
        .may_be_present(x509.ExtendedKeyUsage, AGNOSTIC, _leaf_eku(leaf_eku_forbidden))
    )
    return ChainProfile(name, ca, ee)


# Fulcio leaves: keyUsage digitalSignature; EKU code signing when present (cosign's
# private-PKI certificates may have none: Go's x509 then allows any purpose). Private
# PKI CAs often omit keyUsage (Go accepts that); when present it must allow keyCertSign.
SIGSTORE = _profile("sigstore")

# Notary Project signature specification, "Certificate Requirements": CAs carry a
# critical keyUsage with keyCertSign; the signing certificate is no CA, has keyUsage
# digitalSignature without the listed bits (encipherOnly/decipherOnly need
# keyAgreement), and an EKU, if any, without anyEKU, serverAuth, clientAuth,
# emailProtection, timeStamping. Stricter than the specification, as pullgate always
# was: an EKU that is present must list code signing.
_NOT_FOR_SIGNING = (
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)
_NOT_FOR_CODE_SIGNING = (
    EKU.ANY_EXTENDED_KEY_USAGE,
    EKU.SERVER_AUTH,
    EKU.CLIENT_AUTH,
    EKU.EMAIL_PROTECTION,
    EKU.TIME_STAMPING,
)
NOTATION = _profile(
    "notation",
    ca_key_usage_required=True,
    leaf_key_usage=_leaf_key_usage(forbidden=_NOT_FOR_SIGNING),
    leaf_eku_forbidden=_NOT_FOR_CODE_SIGNING,
)

# OMS (model_signing) certificates. model-transparency's own signing certificate
# asserts cA:TRUE with keyUsage digitalSignature only: harmless in an end entity, so
# the leaf's basicConstraints is not checked. Issuers still must be CAs.
OMS = _profile("oms", leaf_basic_constraints=None, leaf_key_usage=_oms_leaf_usage)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    *,
    anchors: Sequence[x509.Certificate],
    at: dt.datetime,
    profile: ChainProfile,
) -> list[x509.Certificate]:
    """The verified path from ``leaf`` to one of ``anchors`` at time ``at``, leaf first.

    ``intermediates`` come with the signature (untrusted, may include the root);
    ``anchors`` are trusted as given. Raises ``ChainError``.
    """
    # 1. Bounds: the signature chooses how many certificates it presents.
    if len(intermediates) + 1 > MAX_CHAIN:
        raise ChainError(f"certificate chain is longer than {MAX_CHAIN} certificates")
    if not anchors:
        raise ChainError("no trust anchors are configured")
    # 2. The path, under RFC 5280 and the profile.
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
        # 3. For the reason only: was a presented certificate outside its validity at
        #    ``at``, and does the chain reach the anchors at all?
        presented = (leaf, *intermediates)
        reaches = any(c == a or _issued_by(c, a) for c in presented for a in anchors)
        expired = next(
            (c for c in presented if not c.not_valid_before_utc <= at <= c.not_valid_after_utc),
            None,
        )
        raise ChainError(str(exc), outside_validity=expired, reaches_anchor=reaches) from exc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
