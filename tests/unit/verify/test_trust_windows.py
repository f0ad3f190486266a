"""Checks the proxy/verify shrink rewrote and no test asserted by its reason: a Rekor
log key's and a Fulcio CA's ``validFor`` window in the trusted root, judged at the
entry's integration time and at signing time (not now), and the key usages a signing
certificate must carry per chain profile. Real keys, certificates and trusted roots."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.verify.base import SignatureError
from proxy.verify.chains import OMS, SIGSTORE, ChainError, verify_chain
from proxy.verify.rekor import parse_legacy_bundle, verify_set
from proxy.verify.sigstore_trust import (
    SigstoreTrustRoot,
    load_trusted_root,
    verify_certificate_chain,
)
from tests.support.cosign_sign import TestSigstore, generate_key
from tests.support.pki_sign import issue

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def sigstore() -> TestSigstore:
    return TestSigstore()


def _time(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _root(
    sigstore: TestSigstore, path: Path, *, tlog: dict[str, str], ca: dict[str, str]
) -> SigstoreTrustRoot:
    """The test trusted root with these ``validFor`` windows for its Rekor log and CA."""
    doc: dict[str, Any] = sigstore.trusted_root()
    doc["tlogs"][0]["publicKey"]["validFor"] = tlog
    doc["certificateAuthorities"][0]["validFor"] = ca
    path.write_text(json.dumps(doc))
    return load_trusted_root(path)


def _set_at(sigstore: TestSigstore, when: dt.datetime) -> Any:
    body = b'{"kind":"hashedrekord"}'
    return parse_legacy_bundle(
        sigstore.legacy_rekor_bundle(body, integrated_time=int(when.timestamp()))
    )


@pytest.mark.parametrize(
    "integrated", [-2 * DAY, 2 * DAY], ids=["before-the-window", "after-the-window"]
)
def test_refuses_entry_integrated_outside_the_log_keys_validity(
    sigstore: TestSigstore, tmp_path: Path, integrated: dt.timedelta
) -> None:
    window = {"start": _time(sigstore.epoch - DAY), "end": _time(sigstore.epoch + DAY)}
    trust = _root(sigstore, tmp_path / "root.json", tlog=window, ca=window)
    assert verify_set(trust, _set_at(sigstore, sigstore.epoch)).log_id == sigstore.log_id
    with pytest.raises(SignatureError, match="not valid at the entry's integration time"):
        verify_set(trust, _set_at(sigstore, sigstore.epoch + integrated))


def test_refuses_certificate_from_a_ca_outside_its_validity_at_signing_time(
    sigstore: TestSigstore, tmp_path: Path
) -> None:
    key = generate_key()
    leaf = sigstore.issue_certificate(key, not_before=sigstore.epoch + 2 * DAY)
    signed_at = sigstore.epoch + 2 * DAY + dt.timedelta(minutes=1)
    open_ended = {"start": _time(sigstore.epoch - DAY)}
    good = _root(sigstore, tmp_path / "good.json", tlog=open_ended, ca=open_ended)
    assert verify_certificate_chain(good, leaf, [], at=signed_at).spki_der == key.spki_der
    # The CA's window closed a day before the signature (its certificates are still
    # valid then): the trusted root no longer vouches for what it issued.
    closed = {"start": _time(sigstore.epoch - DAY), "end": _time(sigstore.epoch + DAY)}
    expired = _root(sigstore, tmp_path / "closed.json", tlog=open_ended, ca=closed)
    with pytest.raises(SignatureError, match="certificate authority was not valid at signing"):
        verify_certificate_chain(expired, leaf, [], at=signed_at)


def test_refuses_oms_signing_certificate_with_neither_key_usage_nor_eku() -> None:
    root = issue("root", ca=True, key_usage="ca")
    at = dt.datetime.now(dt.UTC)
    bare = issue("bare signer", issuer=root)
    with pytest.raises(ChainError, match="neither keyUsage nor EKU"):
        verify_chain(bare.cert, [], anchors=[root.cert], at=at, profile=OMS)
    # An EKU for code signing alone is enough for model_signing.
    eku_only = issue("eku signer", issuer=root, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    assert verify_chain(eku_only.cert, [], anchors=[root.cert], at=at, profile=OMS)[0] == (
        eku_only.cert
    )


def test_refuses_fulcio_signing_certificate_without_key_usage() -> None:
    root = issue("root", ca=True, key_usage="ca")
    at = dt.datetime.now(dt.UTC)
    eku_only = issue("eku signer", issuer=root, ca=False, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    with pytest.raises(ChainError, match="no keyUsage extension"):
        verify_chain(eku_only.cert, [], anchors=[root.cert], at=at, profile=SIGSTORE)
    # Without an EKU (cosign's private-PKI certificates) it is any purpose, as Go has it.
    usage_only = issue("usage signer", issuer=root, ca=False, key_usage="sign")
    assert verify_chain(usage_only.cert, [], anchors=[root.cert], at=at, profile=SIGSTORE)
