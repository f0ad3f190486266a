"""OMS model signing (OpenSSF ``model_signing``) for models shipped as OCI artifacts.

A signed model (``model.sig``) is a Sigstore bundle v0.3 whose DSSE envelope carries an
in-toto statement listing each file's sha256. In a registry it is a referrer of the
model manifest (artifactType ``application/vnd.dev.sigstore.bundle.v0.3+json``), or a
layer of the model itself (``model.sig``, as KitOps ships it). Raw layers (named by
``org.cncf.model.filepath`` or ``org.opencontainers.image.title``) have the files'
sha256 as digests, so they are verified **without downloading the weights**; tar
layers get a per-file plan (``proxy.pipeline.tarcheck``) checked as they stream:

1. the DSSE signature verifies: with a PEM key or a certificate by ``model_signing``'s
   own verifiers (reached through ``_verify_signed_content``, the hook its verifier
   classes implement: its public entry point hashes a model directory, so model-signing
   is pinned below 1.2); keyless by sigstore-python, offline. model_signing checks a
   chain with OpenSSL at the leaf's own notBefore (never for expiry) and without
   key-usage rules, so ``chains.verify_chain`` (profile ``OMS``) checks it first;
2. ``model_signing`` reads the statement into its manifest (subject digest checked);
3. pullgate's own part: the signed files are exactly the model's files: raw layers
   by digest now, tar layers (``proxy.oci.model``) by the plan handed to the pipeline.

The statement binds files only: not the manifest, its config, annotations,
artifactType or subject, so signed files can be replayed into any manifest. Before
any of the above (0.), what the manifest brings besides files must be harmless.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore_pb, signing

from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError
from proxy.oci.manifest import Descriptor, Manifest
from proxy.oci.mediatypes import MODEL_SIGNATURE_FILE, SIGSTORE_BUNDLE_V03, TITLE
from proxy.oci.model import (
    config_content_refusal,
    config_is_empty,
    config_refusal,
    layer_path,
    model_layout,
    unsafe_layer_name,
)
from proxy.pipeline.gate import ArtifactSource
from proxy.pipeline.tarcheck import LayerPlan, ignored
from proxy.verify.base import (
    TRANSIENT_ERRORS,
    CheckResult,
    Limits,
    PolicyError,
    SignatureError,
    Subject,
    TrustConfig,
    fetch_referrer,
    fetch_signature_blob,
    first_line,
    json_object,
    list_referrers,
)
from proxy.verify.chains import MAX_CHAIN, OMS, ChainError, verify_chain
from proxy.verify.keys import KeyFormatError, VerificationKey, load_public_key_pem

IN_TOTO = "application/vnd.in-toto+json"
PREDICATE_V1 = "https://model_signing/signature/v1.0"
PREDICATE_V01 = "https://model_signing/Digests/v0.1"
MAX_RESOURCES = 100_000
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What a verified OMS statement says was signed: file name -> sha256 hex."""

    files: dict[str, str]
    predicate_type: str
    ignore: tuple[str, ...] = ()
    """The paths the signer left out (the statement's ``ignore_paths``)."""
    allow_symlinks: bool = False


# ---- 1. signature ---------------------------------------------------------------------


def _with_temp_file(data: bytes, name: str, use: Callable[[Path], Any]) -> Any:
    """model_signing reads bundles and trust material from paths only."""
    with tempfile.TemporaryDirectory(prefix="pullgate-oms-") as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        return use(path)


def _read(raw: bytes) -> Any:
    try:
        return _with_temp_file(raw, "model.sig", sign_sigstore_pb.Signature.read)
    except Exception as exc:  # model_signing raises many types on hostile bundles
        raise SignatureError(f"bundle does not parse: {first_line(exc)}") from exc


def _payload(signature: Any, verifier: Any) -> bytes:
    """The in-toto payload of ``signature`` once ``verifier`` (model_signing) verified it."""
    try:
        payload_type, payload = verifier._verify_signed_content(signature)
    except Exception as exc:  # InvalidSignature, ValueError, OpenSSL's X509StoreContextError
        raise SignatureError(f"model_signing: {first_line(exc)}") from exc
    if payload_type != IN_TOTO:
        raise SignatureError(f"DSSE payloadType {str(payload_type)[:80]!r} is not in-toto")
    return bytes(payload)


def key_verifier(key: VerificationKey) -> Any:
    """model_signing's verifier for an ECDSA public key (the only kind it signs with)."""
    pem = key.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        return _with_temp_file(pem, "key.pub", sign_ec_key.Verifier)
    except ValueError as exc:
        raise PolicyError(f"model signing key: {first_line(exc)}") from exc


def certificate_verifier(roots: list[x509.Certificate]) -> Any:
    """model_signing's verifier for certificates chaining to ``roots``."""
    pem = b"".join(root.public_bytes(serialization.Encoding.PEM) for root in roots)
    return _with_temp_file(pem, "ca.pem", lambda path: sign_certificate.Verifier([path]))


def verify_with_key(raw: bytes, key: VerificationKey, *, verifier: Any = None) -> bytes:
    """The payload of a key-signed bundle (``verifier``: a prebuilt ``key_verifier``)."""
    signature = _read(raw)
    if signature.bundle.verification_material.public_key is None:
        raise SignatureError("bundle has no public-key material (signed with a certificate?)")
    return _payload(signature, verifier or key_verifier(key))


def verify_with_ca(raw: bytes, roots: list[x509.Certificate], *, verifier: Any = None) -> bytes:
    """The payload of a certificate-signed bundle whose chain reaches ``roots``.

    A bundle carries no trusted signing time, so the chain must be valid ``now``.
    """
    signature = _read(raw)
    presented = signature.bundle.verification_material.x509_certificate_chain
    if presented is None or not presented.certificates:
        raise SignatureError("bundle has no certificate chain (signed with a key?)")
    # 1a. pullgate's chain rules (CA bits, path length, validity now, key usages).
    try:
        chain = [
            x509.load_der_x509_certificate(bytes(c.raw_bytes))
            for c in presented.certificates[: MAX_CHAIN + 1]
        ]
        verify_chain(chain[0], chain[1:], anchors=roots, at=dt.datetime.now(dt.UTC), profile=OMS)
    except ChainError as exc:
        raise SignatureError(
            f"bundle certificate does not chain to the configured CA: {exc}"
        ) from exc
    except ValueError as exc:
        raise SignatureError("bundle certificate does not parse") from exc
    # 1b. model_signing: its own chain check, then the DSSE signature.
    return _payload(signature, verifier or certificate_verifier(roots))


def verify_with_sigstore(raw: bytes, verifier: Any, identity: Any) -> bytes:
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle

    from proxy.verify.bundle import _IdentityPolicy

    try:
        bundle = Bundle.from_json(raw)
        payload_type, payload = verifier.verify_dsse(bundle, _IdentityPolicy(identity))
    except SigstoreError as exc:
        raise SignatureError(f"sigstore: {str(exc).splitlines()[0][:200]}") from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SignatureError(f"bundle is malformed: {str(exc)[:200]}") from exc
    if payload_type != IN_TOTO:
        raise SignatureError(f"DSSE payloadType {payload_type[:80]!r} is not in-toto")
    return bytes(payload)


# ---- 2. what was signed ---------------------------------------------------------------

# pullgate hashes nothing, so these parameters (which tell model_signing how to hash a
# model directory) do not affect it; statements that omit them are still read.
_SERIALIZATION_DEFAULTS = {"method": "files", "hash_type": "sha256", "allow_symlinks": False}


def parse_statement(payload: bytes) -> ModelSignature:
    """The files an OMS in-toto statement signs, read by model_signing."""
    statement = json_object(payload, "in-toto statement")
    predicate_type = statement.get("predicateType")
    if predicate_type not in (PREDICATE_V1, PREDICATE_V01):
        shown = str(predicate_type)[:100]
        raise SignatureError(f"predicate type {shown!r} is not OMS model signing")
    predicate = statement.get("predicate")
    resources = predicate.get("resources") if isinstance(predicate, dict) else None
    if predicate_type == PREDICATE_V1:
        if not isinstance(resources, list) or len(resources) > MAX_RESOURCES:
            raise SignatureError("OMS predicate has no resources list")
        serialization = predicate.get("serialization") or {}  # type: ignore[union-attr]
        if not isinstance(serialization, dict):
            raise SignatureError("OMS serialization is not an object")
        predicate["serialization"] = {**_SERIALIZATION_DEFAULTS, **serialization}  # type: ignore[index]
    elif len(statement.get("subject") or []) > MAX_RESOURCES:
        raise SignatureError("OMS statement lists too many files")
    try:
        manifest = signing.dsse_payload_to_manifest(statement)
        method = manifest.serialization_type.get("method")
        descriptors = list(manifest.resource_descriptors())
    except Exception as exc:  # model_signing: KeyError, TypeError, ValueError, ...
        raise SignatureError(f"OMS statement: {first_line(exc)}") from exc
    if method != "files":
        raise SignatureError(
            f"OMS serialization {str(method)[:40]!r} is not by files: pullgate checks "
            "whole files (sign with the files serialization, not shards)"
        )
    if isinstance(resources, list) and len(descriptors) != len(resources):
        raise SignatureError("OMS statement lists a file twice")
    files: dict[str, str] = {}
    for descriptor in descriptors:
        if descriptor.digest.algorithm != "sha256":
            raise SignatureError("OMS resource is not a sha256 file digest")
        files[descriptor.identifier] = descriptor.digest.digest_hex
    # model_signing reads ignore_paths into a list of str (str() of each item).
    options = manifest.serialization_type
    return ModelSignature(
        files,
        str(predicate_type),
        ignore=tuple(p for p in options.get("ignore_paths", ()) if p),
        allow_symlinks=options.get("allow_symlinks") is True,
    )


# ---- 3. the files are the model's -----------------------------------------------------


def check_files(
    signature: ModelSignature, files: Mapping[str, str], ignore: tuple[str, ...]
) -> None:
    """The signed files must be exactly ``files`` (name -> sha256 hex), minus ignored ones."""
    wanted = {n: d for n, d in files.items() if not ignored(n, ignore)}
    for name, digest in sorted(signature.files.items()):
        have = wanted.get(name)
        if have is None:
            raise SignatureError(f"signed file {name[:120]} is not in the model")
        if have != digest:
            raise SignatureError(
                f"file {name[:120]} has digest sha256:{have}, signed sha256:{digest}"
            )
    unsigned = sorted(set(wanted) - set(signature.files))
    if unsigned:
        raise SignatureError(f"file {unsigned[0][:120]} is not covered by the signature")


def layer_plans(
    signature: ModelSignature,
    model: Manifest,
    ignore: tuple[str, ...],
    *,
    source: str,
    in_artifact: Descriptor | None = None,
) -> dict[Digest, LayerPlan]:
    """Match the signed files with ``model``'s layers; the plans of its tar layers.

    1. Raw layers are files: each must be signed, with its digest (checked here).
    2. A tar layer holds the signed files at or under its ``org.cncf.model.filepath``;
       one tar layer without that annotation holds the files no other layer holds.
    3. Every signed file (minus the ignore rules) is held by exactly one layer.
    """
    skip = ignore + signature.ignore
    # Every name a layer may be written as (its title, its filepath) is that layer's
    # alone: an unpacker that reads titles must not write one layer over another's file.
    # So no two layers (raw, tar or signature) share a path either. A layer under an
    # ignore rule is not checked: each of its names must be under one too.
    claimed: dict[str, int] = {}
    for index, each in enumerate(model.layers):
        problem = unsafe_layer_name(each)
        if problem is not None:
            raise SignatureError(problem)
        path, title = layer_path(each), _clean_title(each)
        if path and title and ignored(path, skip) and not ignored(title, skip):
            raise SignatureError(
                f"layer {each.digest} at {path[:120]} is under an ignore rule, but titled "
                f"{title[:120]}, which is not"
            )
        for name in (path, title):
            if name and claimed.setdefault(name, index) != index:
                raise SignatureError(f"file {name[:120]} is in two layers")
    layout = model_layout(model)
    raw_files = dict(layout.raw_files)
    nameless = list(layout.unnamed)
    tar_skip: tuple[str, ...] = ()
    for layer in layout.signature_layers:
        path = layer_path(layer)
        if layer == in_artifact:
            # The verified signature itself: only a model.sig file, never a model file
            # or directory (its path is left out of the tar layers' checks).
            if path is not None and path.rsplit("/", 1)[-1] != MODEL_SIGNATURE_FILE:
                raise SignatureError(
                    f"the signature layer is named {path[:120]}, not {MODEL_SIGNATURE_FILE}"
                )
            tar_skip = (path or MODEL_SIGNATURE_FILE,)
        # Any other signature layer is bytes this signature does not cover: a file like
        # any other (signed, or under an ignore rule).
        elif path is None:
            nameless.append(layer)
        else:
            raw_files[path] = layer
    if nameless:
        raise SignatureError(f"layer {nameless[0].digest} names no file (no {TITLE} annotation)")
    signed = {n: d for n, d in signature.files.items() if not ignored(n, skip)}
    if not signed:
        raise SignatureError("the signature lists no file of the model (after the ignore rules)")
    # 1. raw layers (without tar layers, they hold every signed file)
    for path, layer in sorted(raw_files.items()):
        if layer.digest.algorithm != "sha256":
            raise SignatureError(f"layer {path[:80]} is not sha256-addressed")
    raw = {p: layer.digest.hex for p, layer in raw_files.items()}
    on_raw = {n: d for n, d in signed.items() if n in raw} if layout.tar_layers else signed
    check_files(ModelSignature(on_raw, signature.predicate_type), raw, skip)
    if not layout.tar_layers:
        return {}
    # 2. tar layers
    holder = set(on_raw)
    held: dict[Digest, dict[str, str]] = {}
    unnamed = [t for t in layout.tar_layers if t.path is None]
    if len(unnamed) > 1:
        raise SignatureError(
            f"tar layers {unnamed[0].descriptor.digest} and {unnamed[1].descriptor.digest} "
            "carry no org.cncf.model.filepath: which files each holds is unknown"
        )
    for tar in layout.tar_layers:
        if tar.path is None:
            continue
        prefix = tar.path + "/"
        files = {n: d for n, d in signed.items() if n == tar.path or n.startswith(prefix)}
        for name in files:
            if name in holder:
                raise SignatureError(f"file {name[:120]} is in two layers")
            holder.add(name)
        held[tar.descriptor.digest] = files
    for tar in unnamed:
        held[tar.descriptor.digest] = {n: d for n, d in signed.items() if n not in holder}
        holder.update(held[tar.descriptor.digest])
    # A layer holding no signed file is not in the signed file list: refused now, not
    # streamed with an empty plan (unless its whole path is under an ignore rule).
    for tar in layout.tar_layers:
        if not held[tar.descriptor.digest] and not (tar.path and ignored(tar.path, skip)):
            named = f" ({tar.path[:120]})" if tar.path else ""
            raise SignatureError(f"layer {tar.descriptor.digest}{named} holds no signed file")
    # 3. nothing signed is left out
    missing = sorted(set(signed) - holder)
    if missing:
        raise SignatureError(f"signed file {missing[0][:120]} is not in the model")
    all_signed = tuple(sorted(signed.items())) if signature.allow_symlinks else ()
    return {
        tar.descriptor.digest: LayerPlan(
            compression=tar.compression,
            files=tuple(sorted(held[tar.descriptor.digest].items())),
            ignore=skip + tar_skip,
            allow_symlinks=signature.allow_symlinks,
            signed=all_signed,
            source=source,
        )
        for tar in layout.tar_layers
    }


def _clean_title(layer: Descriptor) -> str | None:
    title = (layer.annotations or {}).get(TITLE)
    return "/".join(p for p in title.split("/") if p not in ("", ".")) if title else None


# ---- the verifier ---------------------------------------------------------------------


class OMSVerifier:
    def __init__(
        self, *, label: str, check: Any, ignore: tuple[str, ...], allow_image_config: bool = False
    ) -> None:
        self._label = label
        self._check = check
        self._ignore = ignore
        self._allow_image_config = allow_image_config

    def describe(self) -> str:
        return self._label

    @property
    def allow_image_config(self) -> bool:
        """Whether the config is left to another requirement (the policy checks one)."""
        return self._allow_image_config

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        """1. a ``model.sig`` layer of the model itself, 2. the bundles that refer to it."""
        try:
            model = await source.manifest(str(subject.digest), max_bytes=4 * 1024 * 1024)
        except TRANSIENT_ERRORS:
            raise
        except OCIError as exc:
            return CheckResult(False, f"modelSigning: cannot fetch the model: {exc.message}")
        if model is None:
            return CheckResult(False, "modelSigning: the model manifest is gone")
        uncovered = await self._uncovered(model, source)
        if uncovered is not None:
            return CheckResult(False, f"modelSigning: {uncovered}")
        reasons: list[str] = []
        for layer in model_layout(model).signature_layers[: limits.max_signatures]:
            reason = await self._bundle(source, limits, model, layer)
            if reason is None:
                return CheckResult(True, f"modelSigning {layer_path(layer)} layer verified")
            reasons.append(reason)
        try:
            descriptors = await list_referrers(source, subject, SIGSTORE_BUNDLE_V03)
        except SignatureError as exc:
            reasons.append(f"cannot fetch signatures: {exc}")
            return CheckResult(False, "modelSigning: " + "; ".join(reasons)[:600])
        if not descriptors and not reasons:
            return CheckResult(False, "modelSigning: no model signatures found")
        for descriptor in descriptors[: limits.max_signatures]:
            try:
                referrer = await fetch_referrer(source, descriptor, subject, limits)
                if len(referrer.layers) != 1:
                    reason = "a bundle manifest must have exactly one layer"
                else:
                    layer = referrer.layers[0]
                    reason = await self._bundle(source, limits, model, layer, referred=True)
            except TRANSIENT_ERRORS:
                raise
            except OCIError as exc:
                reason = exc.message
            except SignatureError as exc:
                reason = f"signature manifest {descriptor.digest}: {exc}"
            if reason is None:
                return CheckResult(True, f"modelSigning bundle {descriptor.digest} verified")
            reasons.append(reason)
        return CheckResult(False, "modelSigning: " + "; ".join(sorted(set(reasons)))[:600])

    async def _uncovered(self, model: Manifest, source: ArtifactSource) -> str | None:
        """0. Why ``model`` asks a model signature to authorise more than files, or None.

        An index is no model. The config must be ``{}`` or a model config that is not an
        image config in disguise (``proxy.oci.model.config_refusal``): containerd runs
        what an image config says, and no OMS signature covers it. A model config is
        metadata that nothing signed mentions (its ``modelfs.diffIds`` are layer
        digests, not file digests), so nothing in it is checked against the signature.
        Annotations, artifactType and subject are not bound either; pullgate trusts
        none of them for more than selecting a scope. ``allowImageConfig`` leaves the
        config to a requirement that signs the manifest (cosign or notation, in allOf).
        """
        if model.is_index:
            return "an index is not a model (verify indexes with cosign or notation)"
        if self._allow_image_config:
            return None
        refusal = config_refusal(model.config)
        if refusal is not None:
            return (
                f"{refusal} (to allow it, require a cosign or notation signature of the "
                "manifest too, in allOf, and set allowImageConfig: true)"
            )
        config = model.config
        if config is None or config_is_empty(config):
            return None
        if config.size > MAX_CONFIG_BYTES:
            return f"the config of {config.size} bytes exceeds the {MAX_CONFIG_BYTES}-byte cap"
        try:
            content = await source.blob(config.digest, max_bytes=MAX_CONFIG_BYTES)
        except TRANSIENT_ERRORS:
            raise
        except OCIError as exc:
            return f"cannot fetch the config: {exc.message}"
        return config_content_refusal(config.media_type, content)

    async def _bundle(
        self,
        source: ArtifactSource,
        limits: Limits,
        model: Manifest,
        layer: Descriptor,
        *,
        referred: bool = False,
    ) -> str | None:
        """Verify one bundle (a referrer's layer, or the model's own ``model.sig``
        layer) against ``model``; on success hand its tar layers' plans to the pipeline."""
        where = "bundle" if referred else f"{layer_path(layer) or 'model.sig'} layer"
        try:
            raw = await fetch_signature_blob(source, layer, limits, what=where)
        except SignatureError as exc:
            return str(exc)

        def check() -> dict[Digest, LayerPlan]:
            signature = parse_statement(self._check(raw))
            in_artifact = None if referred else layer
            return layer_plans(
                signature, model, self._ignore, source=self._label, in_artifact=in_artifact
            )

        try:
            plans = await asyncio.to_thread(check)
        except SignatureError as exc:
            return str(exc) if referred else f"{where}: {exc}"
        for digest, plan in plans.items():
            source.expect_layer_files(digest, plan)
        return None


def oms_verifier_from_spec(
    spec: Mapping[str, Any], *, base_dir: Path, trust: TrustConfig
) -> OMSVerifier:
    known = {"key", "certificate", "sigstore", "ignorePaths", "allowImageConfig"}
    unknown = set(spec) - known
    if unknown:
        raise PolicyError(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    ignore = spec.get("ignorePaths") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise PolicyError("ignorePaths must be a list of paths")
    allow_image_config = spec.get("allowImageConfig", False)
    if not isinstance(allow_image_config, bool):
        raise PolicyError("allowImageConfig must be true or false")
    if sum(k in spec for k in ("key", "certificate", "sigstore")) != 1:
        raise PolicyError("modelSigning needs exactly one of key, certificate or sigstore")
    check: Callable[[bytes], bytes]
    if "key" in spec:
        path = base_dir / str(spec["key"])
        try:
            key = load_public_key_pem(path.read_bytes())
        except (OSError, KeyFormatError) as exc:
            raise PolicyError(f"cannot load key {path}: {exc}") from exc
        label = f"key {spec['key']}"
        check = partial(verify_with_key, key=key, verifier=key_verifier(key))
    elif "certificate" in spec:
        ca = spec["certificate"].get("caFile") if isinstance(spec["certificate"], dict) else None
        if not isinstance(ca, str):
            raise PolicyError("certificate needs caFile")
        try:
            roots = x509.load_pem_x509_certificates((base_dir / ca).read_bytes())
        except (OSError, ValueError) as exc:
            raise PolicyError(f"cannot load CA file {ca}: {exc}") from exc
        if not roots:
            raise PolicyError(f"CA file {ca} holds no certificates")
        label = f"certificate caFile {ca}"
        check = partial(verify_with_ca, roots=roots, verifier=certificate_verifier(roots))
    else:
        options = spec["sigstore"]
        if not isinstance(options, dict) or not {"issuer", "subject"} <= set(options):
            raise PolicyError("sigstore needs issuer and subject")
        if trust.sigstore_trusted_root is None:
            raise PolicyError("sigstore model signing needs trust.sigstoreTrustedRoot")
        from proxy.verify.bundle import sigstore_verifier_for
        from proxy.verify.sigstore_trust import KeylessIdentity, Matcher, load_trusted_root

        identity = KeylessIdentity(
            subject=Matcher.parse(options["subject"], where="modelSigning.sigstore.subject"),
            issuer=Matcher.parse(options["issuer"], where="modelSigning.sigstore.issuer"),
        )
        verifier = sigstore_verifier_for(load_trusted_root(trust.sigstore_trusted_root))
        label = f"sigstore {identity.describe()}"
        check = partial(verify_with_sigstore, verifier=verifier, identity=identity)
    return OMSVerifier(
        label=f"modelSigning {label}",
        check=check,
        ignore=tuple(ignore),
        allow_image_config=allow_image_config,
    )
