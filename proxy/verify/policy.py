"""The node's signature policy: scopes, modes and requirements, loaded from YAML.

The format, with an example, is README.md's "Signature policy"; paths in the file are
relative to it. Its keys: ``default`` (deny | warn | allow, for references no scope
matches), ``trust``, ``limits``, ``verdictCache`` (TTLs in seconds; 0: do not cache) and
``scopes``, each with a ``match`` glob, optional ``artifactTypes``, ``layerMediaTypes``,
``namespaces`` and ``podLabels``, a ``mode`` (enforce | warn | allow), ``indexes``
(coverChildren | eachChild) and ``require``: ``anyOf``/``allOf`` nested freely over
``cosign``, ``notation``, ``modelSigning``, ``referrers`` and ``attestation``.

``referrers`` entries are found with the OCI referrers API (or its ``sha256-<hex>`` tag
fallback) by ``artifactType``; a referrer counts only if it names the manifest as its
``subject`` and its own manifest digest satisfies ``signedBy``. ``attestation`` is a
cosign attestation (a DSSE sigstore bundle referrer) whose in-toto statement is about
the manifest and has that ``predicateType``.

Globs: ``*`` matches within one path segment, ``**`` across segments (also none), ``?``
one character of a segment. Registry names are matched case-insensitively and Docker
Hub's aliases (``index.docker.io``, ``registry-1.docker.io``) and implicit ``library/``
are normalised on both sides, so ``docker.io/nginx`` is matched as
``docker.io/library/nginx``; a one-segment Hub pattern without ``**`` gets ``library/``
too (``docker.io/*`` is the official images, ``docker.io/**`` is all of Hub).

When several scopes match, a scope for pods (``namespaces``, ``podLabels``: it applies
only to kubelet's pulls through the CRI front end for pods in those namespaces and with
those labels, and to containerd's pull that follows) wins over one for anyone; then the
most specific wins: the one with the most literal (non-wildcard) characters, then the
fewest wildcard characters (``**`` counts two), then the first in the file. A scope with
``artifactTypes`` applies only to manifests of those types (the manifest's
``artifactType``, else its config media type); one with ``layerMediaTypes`` only to
manifests with at least one layer of those media types (both: both must hold).

``revision`` is the sha256 (64 hex digits; logs print the first 16) of the file's bytes
and of every trust file it names (keys, CA files, trusted roots, Notation trust policies
and trust stores), so rotating a key under an unchanged policy file is a new revision
too: verdicts made under the old material are not reused. A trust file that changes
while the policy loads makes the load fail (the reload watcher tries again), so a
revision never names material other than what the verifiers read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, cast

import yaml

from proxy.oci.errors import OCIError
from proxy.oci.manifest import ArtifactKind
from proxy.oci.reference import DOCKER_HUB, DOCKER_HUB_ALIASES, upstream_repository
from proxy.pipeline.gate import ArtifactSource, Pod, RepoKey
from proxy.verify.base import (
    TRANSIENT_ERRORS,
    CheckResult,
    Limits,
    PolicyError,
    SignatureError,
    Subject,
    TrustConfig,
    Verifier,
    fetch_referrer,
    list_referrers,
)

log = logging.getLogger("pullgate.policy")

Mode = Literal["enforce", "warn", "allow"]
Default = Literal["deny", "warn", "allow"]
MODES: tuple[Mode, ...] = ("enforce", "warn", "allow")
DEFAULTS: tuple[Default, ...] = ("deny", "warn", "allow")
MAX_REASON = 1500
MAX_MATCH_LENGTH = 512
# Bounds on the trust material hashed into the revision: a policy naming a huge tree
# (say ``trustStore: /``) is a mistake, refused rather than walked.
MAX_MATERIAL_FILES = 2048
MAX_MATERIAL_BYTES = 64 * 1024 * 1024
# Where each requirement names trust files or directories (a path of keys into its spec).
MATERIAL_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "cosign": (("key",),),
    "notation": (("trustPolicy",), ("trustStore",)),
    "modelSigning": (("key",), ("certificate", "caFile")),
}


class Requirement(Protocol):
    def describe(self) -> str:
        """A short label for denials."""

    @property
    def needs_referrers(self) -> bool:
        """Whether it requires referrers of the manifest itself (an SBOM, an
        attestation), which a verified index's coverage of a child does not prove."""

    async def evaluate(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        observe: LeafObserver | None = None,
    ) -> CheckResult:
        """Whether the subject satisfies this requirement, with the reason; ``observe``
        hears each verifier's result (metrics)."""


@dataclass(frozen=True, slots=True)
class Leaf:
    """One verifier (``cosign: {...}``, ``notation: {...}``, ``modelSigning: {...}``)."""

    verifier: Verifier
    needs_referrers: bool = False
    """A cosign leaf with a predicateType: it requires an attestation of the manifest."""

    def describe(self) -> str:
        return self.verifier.describe()

    @property
    def format(self) -> str:
        """The signature format: cosign, notation or modelSigning."""
        return self.describe().split(" ", 1)[0]

    async def evaluate(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        observe: LeafObserver | None = None,
    ) -> CheckResult:
        # Verifiers report failures as CheckResult; anything they raise anyway is still
        # a refusal of this leaf (with the reason), except an unreachable registry.
        try:
            result = await self.verifier.verify(subject, source, limits)
        except SignatureError as exc:
            result = CheckResult(False, str(exc) or "signature does not verify")
        except TRANSIENT_ERRORS:
            raise
        except OCIError as exc:
            result = CheckResult(False, exc.message)
        except PolicyError as exc:
            result = CheckResult(False, f"trust material error: {exc}")
        except Exception as exc:
            log.exception(
                "verifier %s failed on %s@%s", self.describe(), subject.name, subject.digest
            )
            result = CheckResult(
                False, f"verifier error ({type(exc).__name__}); see pullgate's log"
            )
        if observe is not None:
            observe(self, result)
        return result


LeafObserver = Callable[[Leaf, CheckResult], None]


def _failure(child: Requirement, result: CheckResult) -> str:
    # A composite child's reason already says "allOf failed: ..."; a leaf's needs its label.
    if isinstance(child, Leaf):
        return f"{child.describe()}: {result.reason}"
    return f"({result.reason})"


@dataclass(frozen=True, slots=True)
class _Composite:
    children: tuple[Requirement, ...]
    keyword: ClassVar[str]
    empty: ClassVar[str]
    every: ClassVar[bool]
    """allOf: every child must pass (evaluation stops at the first failure); anyOf: the
    first child that passes wins, and if none does every child's reason is kept."""

    def __post_init__(self) -> None:
        # Fail closed however it is built: an empty list is never a requirement.
        if not self.children:
            raise PolicyError(f"{self.keyword} needs at least one requirement: {self.empty}")

    def describe(self) -> str:
        return f"{self.keyword}[" + ", ".join(c.describe() for c in self.children) + "]"

    @property
    def needs_referrers(self) -> bool:
        return any(child.needs_referrers for child in self.children)

    async def evaluate(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        observe: LeafObserver | None = None,
    ) -> CheckResult:
        reasons = []
        for child in self.children:
            result = await child.evaluate(subject, source, limits, observe)
            if result.ok and not self.every:
                return result
            if not result.ok and self.every:
                return CheckResult(False, f"allOf failed: {_failure(child, result)}")
            reasons.append(result.reason if result.ok else _failure(child, result))
        if self.every:
            return CheckResult(True, "; ".join(reasons))
        return CheckResult(False, "anyOf failed: " + " | ".join(reasons))


@dataclass(frozen=True, slots=True)
class AllOf(_Composite):
    keyword = "allOf"
    empty = "an empty allOf would allow"
    every = True


@dataclass(frozen=True, slots=True)
class AnyOf(_Composite):
    keyword = "anyOf"
    empty = "an empty list is an error"
    every = False


@dataclass(frozen=True, slots=True)
class RequiredReferrer:
    """A referrer of ``artifact_type`` (an SBOM, an AIBOM) must exist, be about the
    manifest, and its own manifest must satisfy ``signed_by``."""

    artifact_type: str
    signed_by: Requirement
    needs_referrers = True

    def describe(self) -> str:
        return f"referrer {self.artifact_type} signed by {self.signed_by.describe()}"

    async def evaluate(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        observe: LeafObserver | None = None,
    ) -> CheckResult:
        """1. list the referrers of this type; 2. fetch each (bounded) and check it is
        about the subject; 3. check its signature with ``signed_by``; one must pass."""
        wanted = f"required referrer {self.artifact_type}"
        try:
            listed = await list_referrers(source, subject, self.artifact_type, untyped=False)
        except SignatureError as exc:
            return CheckResult(False, f"{wanted}: {exc}")
        if not listed:
            return CheckResult(False, f"{wanted} is missing")
        failures = []
        for descriptor in listed[: limits.max_signatures]:
            where = descriptor.digest.hex[:16]
            try:
                referrer = await fetch_referrer(
                    source, descriptor, subject, limits, artifact_type=self.artifact_type
                )
            except TRANSIENT_ERRORS:
                raise
            except (OCIError, SignatureError) as exc:  # an OCIError's str is its message
                failures.append(f"{where}: {exc}")
                continue
            referrer_subject = replace(
                subject,
                digest=referrer.digest,
                media_type=referrer.media_type,
                size=len(referrer.raw),
            )
            result = await self.signed_by.evaluate(referrer_subject, source, limits, observe)
            if result.ok:
                return CheckResult(True, f"referrer {self.artifact_type} {where}: {result.reason}")
            failures.append(f"{where}: {result.reason}")
        if len(listed) > limits.max_signatures:
            failures.append(f"only the first {limits.max_signatures} referrers were examined")
        return CheckResult(
            False,
            f"{wanted} is not signed as required ({self.signed_by.describe()}): "
            + "; ".join(failures),
        )


@dataclass(frozen=True, slots=True)
class RequiredAttestation:
    """A cosign attestation with ``predicate_type`` must verify; ``signed_by`` holds
    cosign requirements that accept only DSSE statements of that predicate type."""

    predicate_type: str
    signed_by: Requirement
    needs_referrers = True

    def describe(self) -> str:
        return f"attestation {self.predicate_type} signed by {self.signed_by.describe()}"

    async def evaluate(
        self,
        subject: Subject,
        source: ArtifactSource,
        limits: Limits,
        observe: LeafObserver | None = None,
    ) -> CheckResult:
        result = await self.signed_by.evaluate(subject, source, limits, observe)
        if result.ok:
            return CheckResult(True, f"attestation {self.predicate_type}: {result.reason}")
        return CheckResult(
            False,
            f"required attestation {self.predicate_type} is missing or not signed as "
            f"required: {result.reason}",
        )


@dataclass(frozen=True, slots=True)
class Scope:
    match: str
    mode: Mode
    require: Requirement | None
    artifact_types: frozenset[str] | None = None
    cover_children: bool = True
    order: int = 0
    namespaces: frozenset[str] | None = None
    """Pods' namespaces the scope is for (CRI pulls only); None: every request."""
    pod_labels: tuple[tuple[str, str], ...] | None = None
    """Labels a pod must all carry for the scope to apply (CRI pulls only)."""
    layer_media_types: frozenset[str] | None = None
    """The scope applies only to manifests with a layer of one of these media types."""

    @property
    def for_pods(self) -> bool:
        """Whether the scope applies only to some pods' pulls."""
        return self.namespaces is not None or self.pod_labels is not None

    _regex: re.Pattern[str] = field(default=re.compile(""), repr=False, compare=False)
    fingerprint: str = field(default="", repr=False, compare=False)
    """sha256 of the scope's YAML (canonical); "" for a scope not read from a file."""

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        """Sort key: naming namespaces, then more literal characters, then fewer
        wildcards, then earlier in file."""
        wildcards = self.match.count("*") + self.match.count("?")
        return (self.for_pods, len(self.match) - wildcards, -wildcards, -self.order)

    def applies(self, name: str, artifact: ArtifactKind, pod: Pod | None = None) -> bool:
        if self.artifact_types is not None and artifact.artifact_type not in self.artifact_types:
            return False
        if self.layer_media_types is not None and self.layer_media_types.isdisjoint(
            artifact.layer_types
        ):
            return False
        if self.namespaces is not None and (pod is None or pod.namespace not in self.namespaces):
            return False
        if self.pod_labels is not None and (pod is None or not pod.has_labels(self.pod_labels)):
            return False
        return self._regex.fullmatch(name) is not None

    def label(self) -> str:
        pods = []
        if self.namespaces is not None:
            pods.append("namespaces " + ",".join(sorted(self.namespaces)))
        if self.pod_labels is not None:
            pods.append("labels " + ",".join(f"{k}={v}" for k, v in self.pod_labels))
        if pods:
            return f'scope "{self.match}" for pods in {" with ".join(pods)} ({self.mode})'
        return f'scope "{self.match}" ({self.mode})'


@dataclass(frozen=True, slots=True)
class Policy:
    default: Default
    scopes: tuple[Scope, ...]
    limits: Limits
    positive_ttl: float
    negative_ttl: float
    revision: str
    source: str
    material: tuple[Path, ...] = ()
    """Trust files and directories the policy names (the reload watcher stats them)."""
    trust_digest: str = ""
    """sha256 over the trust files alone: unchanged when only the YAML changed."""

    @property
    def pod_scoped(self) -> bool:
        """Whether a scope is for some pods only (decisions may then differ by pod)."""
        return any(scope.for_pods for scope in self.scopes)

    def scope_for(
        self, repo: RepoKey, artifact: ArtifactKind | str | None, pod: Pod | None = None
    ) -> Scope | None:
        """The most specific scope for ``repo``, the manifest's kind (or just its
        artifact type) and ``pod`` (None: no pod, e.g. a mirror request), or None."""
        name = policy_name(repo.registry, repo.repository)
        if not isinstance(artifact, ArtifactKind):
            artifact = ArtifactKind(artifact)
        applicable = [scope for scope in self.scopes if scope.applies(name, artifact, pod)]
        # max() keeps the first of equals, as file order wants.
        return max(applicable, key=lambda scope: scope.specificity, default=None)


def policy_name(registry: str, repository: str) -> str:
    """``registry/repository`` as scopes match it (lower-case registry, Hub normalised)."""
    registry = registry.lower()
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    return f"{registry}/{upstream_repository(registry, repository)}"


_GLOB_TOKENS = {"**": ".*", "*": "[^/]*", "?": "[^/]"}


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    # Split into wildcards ("**" before "*") and the literal text between them.
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    return re.compile("".join(_GLOB_TOKENS.get(part, re.escape(part)) for part in parts))


def normalise_match(pattern: str) -> str:
    """Lower-case the registry part and fold Docker Hub aliases, as requests are."""
    registry, slash, rest = pattern.partition("/")
    registry = registry.lower()
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        # One segment on Hub is an official image: "nginx", "ngin?" and "*" all mean
        # library/...; "**" spans segments, so it stays as written.
        if slash and rest and "/" not in rest and "**" not in rest:
            rest = f"library/{rest}"
    return registry + slash + rest


# ---- loading ---------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (a second ``require:`` is a mistake) and
    keys that are not strings."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):  # every key of the format is a name (1, on, [a] are not)
            raise yaml.constructor.ConstructorError(
                None, None, f"mapping keys must be strings, not {key!r}", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; PolicyError says where and why it is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from exc
    return parse_policy(raw, base_dir=path.resolve().parent, source=str(path))


def parse_policy(raw: bytes, *, base_dir: Path, source: str = "<policy>") -> Policy:
    """Parse policy bytes; relative paths resolve against ``base_dir``."""
    try:
        doc = yaml.load(raw, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise PolicyError(f"{source}: YAML nested too deeply") from exc
    where = source
    if doc is None:
        raise PolicyError(f"{where}: the policy is empty (write at least 'default: deny')")
    doc = _mapping(doc, where, {"default", "trust", "limits", "verdictCache", "scopes"})
    default = cast(Default, _choice(doc.get("default", "deny"), f"{where}: default", DEFAULTS))
    material = _Material(base_dir)
    trust = _trust(doc.get("trust") or {}, base_dir, material, f"{where}: trust")
    limits = _limits(doc.get("limits") or {}, f"{where}: limits")
    cache = _mapping(
        doc.get("verdictCache") or {}, f"{where}: verdictCache", {"positiveTTL", "negativeTTL"}
    )
    positive_ttl = _seconds(cache.get("positiveTTL", 300), f"{where}: verdictCache.positiveTTL")
    negative_ttl = _seconds(cache.get("negativeTTL", 30), f"{where}: verdictCache.negativeTTL")
    raw_scopes = doc.get("scopes") or []
    if not isinstance(raw_scopes, list):
        raise PolicyError(f"{where}: scopes must be a list")
    loader = _Loader(base_dir, trust, material)
    scopes = tuple(
        loader.scope(item, order, f"{where}: scopes[{order}]")
        for order, item in enumerate(raw_scopes)
    )
    trust_digest, revision = material.digests(raw)
    return Policy(
        default=default,
        scopes=scopes,
        limits=limits,
        positive_ttl=positive_ttl,
        negative_ttl=negative_ttl,
        revision=revision,
        source=source,
        material=tuple(material.paths),
        trust_digest=trust_digest,
    )


# A Kubernetes namespace name (a DNS label).
_NAMESPACE = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_MEDIA_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE_RE = re.compile(f"{_MEDIA_NAME}/{_MEDIA_NAME}")  # RFC 6838 type/subtype
SIGNATURE_KEYS = ("anyOf", "allOf", "cosign", "notation", "modelSigning")
REQUIREMENT_KEYS = (*SIGNATURE_KEYS, "referrers", "attestation")


def _strings(
    doc: Mapping[str, Any], key: str, where: str, what: str, form: str = ".*"
) -> frozenset[str] | None:
    """``doc[key]``: absent, or a non-empty list of strings matching the regex ``form``."""
    value = doc.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and re.fullmatch(form, v, re.DOTALL) for v in value)
    ):
        raise PolicyError(f"{where}.{key} must be a non-empty list of {what}")
    return frozenset(value)


@dataclass(frozen=True, slots=True)
class _Loader:
    """Loads a policy's scopes and requirements: paths resolve against ``base_dir`` and
    every trust file a requirement names is added to ``material``."""

    base_dir: Path
    trust: TrustConfig
    material: _Material
    signatures_only: bool = False
    """Under a ``signedBy``: only signature requirements are allowed."""
    predicate_type: str | None = None
    """Under an attestation's ``signedBy``: only cosign is allowed, which then accepts
    nothing but DSSE statements of this predicate type."""

    def scope(self, item: Any, order: int, where: str) -> Scope:
        item = _mapping(
            item,
            where,
            {
                "match",
                "artifactTypes",
                "layerMediaTypes",
                "mode",
                "require",
                "indexes",
                "namespaces",
                "podLabels",
            },
        )
        match = item.get("match")
        if not isinstance(match, str) or not match or len(match) > MAX_MATCH_LENGTH:
            raise PolicyError(f"{where}.match must be a non-empty glob like 'registry/repo/**'")
        match = normalise_match(match)
        mode = cast(Mode, _choice(item.get("mode", "enforce"), f"{where}.mode", MODES))
        artifact_types = _strings(item, "artifactTypes", where, "media types")
        layer_media_types = _strings(item, "layerMediaTypes", where, "media types")
        namespaces = _strings(item, "namespaces", where, "namespace names", _NAMESPACE)
        labels = item.get("podLabels")
        if labels is not None and not (
            isinstance(labels, dict)
            and labels
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise PolicyError(f"{where}.podLabels must be a non-empty mapping of label to value")
        indexes = _choice(
            item.get("indexes", "coverChildren"), f"{where}.indexes", ("coverChildren", "eachChild")
        )
        require_doc = item.get("require")
        if require_doc is None and mode != "allow":
            raise PolicyError(f"{where}.require is missing (only mode: allow may omit it)")
        require = None if require_doc is None else self.requirement(require_doc, f"{where}.require")
        if require is not None and _config_unsigned(require, guarded=False):
            raise PolicyError(
                f"{where}.require: modelSigning with allowImageConfig must be in an allOf with "
                "cosign or notation (a signature of the manifest, which covers its config; a "
                "Notation trust policy with a statement at level audit or skip does not count)"
            )
        # mode allow is logged loudly by the gate when the policy goes into force, and on use.
        canonical = json.dumps(item, sort_keys=True, default=str, separators=(",", ":"))
        return Scope(
            match=match,
            mode=mode,
            require=require,
            artifact_types=artifact_types,
            layer_media_types=layer_media_types,
            cover_children=indexes == "coverChildren",
            order=order,
            namespaces=namespaces,
            pod_labels=None if labels is None else tuple(sorted(labels.items())),
            _regex=glob_to_regex(match),
            fingerprint=hashlib.sha256(canonical.encode()).hexdigest(),
        )

    def requirement(self, doc: Any, where: str) -> Requirement:
        """One requirement node (``signatures_only`` and ``predicate_type`` restrict it)."""
        doc = _mapping(doc, where)
        known = SIGNATURE_KEYS if self.signatures_only else REQUIREMENT_KEYS
        if len(doc) != 1:
            raise PolicyError(
                f"{where} must have exactly one key ({', '.join(known)}), "
                f"not {sorted(map(str, doc))}"
            )
        ((key, value),) = doc.items()
        if key in ("anyOf", "allOf"):
            if not isinstance(value, list):
                raise PolicyError(f"{where}.{key} must be a list")
            if not value:
                raise PolicyError(f"{where}.{key} is empty: an empty list is a configuration error")
            children = tuple(
                self.requirement(child, f"{where}.{key}[{i}]") for i, child in enumerate(value)
            )
            return AnyOf(children) if key == "anyOf" else AllOf(children)
        if self.signatures_only and key in ("referrers", "attestation"):
            raise PolicyError(
                f"{where}: {key} cannot be nested in signedBy (it names who signs the referrer: "
                f"one of {', '.join(SIGNATURE_KEYS)})"
            )
        if self.signatures_only and key == "modelSigning":
            raise PolicyError(
                f"{where}: modelSigning cannot sign a required referrer: it signs files, not "
                "the referrer's manifest, so it does not bind the referrer to its subject (use "
                "cosign or notation)"
            )
        if key == "referrers":
            return self.referrers(value, f"{where}.referrers")
        if key == "attestation":
            return self.attestation(value, f"{where}.attestation")
        spec = _mapping(value, f"{where}.{key}")
        if self.predicate_type is not None:
            if key != "cosign":
                raise PolicyError(
                    f"{where}: an attestation's signedBy takes cosign requirements only "
                    f"(cosign attestations are DSSE bundles), not {str(key)[:64]!r}"
                )
            if spec.get("predicateType", self.predicate_type) != self.predicate_type:
                raise PolicyError(
                    f"{where}.cosign.predicateType differs from the attestation's predicateType"
                )
            spec = {**spec, "predicateType": self.predicate_type}
        # Hashed before the verifier reads them (and checked again when the policy is done).
        self.material.add_fields(str(key), spec, f"{where}.{key}")
        try:
            verifier = _verifier(key, spec, self.base_dir, self.trust, where)
        except PolicyError as exc:
            raise PolicyError(f"{where}.{key}: {exc}") from exc
        return Leaf(verifier, needs_referrers=key == "cosign" and "predicateType" in spec)

    def signed_by(
        self, doc: Mapping[str, Any], where: str, predicate_type: str | None = None
    ) -> Requirement:
        if doc.get("signedBy") is None:
            raise PolicyError(
                f"{where}.signedBy is missing: an unsigned referrer proves nothing (anyone who "
                "can push to the repository can attach one)"
            )
        signer = replace(self, signatures_only=True, predicate_type=predicate_type)
        return signer.requirement(doc["signedBy"], f"{where}.signedBy")

    def referrers(self, value: Any, where: str) -> Requirement:
        """``referrers: [{artifactType, signedBy}, ...]``: every entry is required."""
        if not isinstance(value, list):
            raise PolicyError(f"{where} must be a list of {{artifactType, signedBy}}")
        if not value:
            raise PolicyError(f"{where} is empty: an empty list is a configuration error")
        required: list[Requirement] = []
        for i, item in enumerate(value):
            entry = _mapping(item, f"{where}[{i}]", {"artifactType", "signedBy"})
            artifact_type = entry.get("artifactType")
            if not isinstance(artifact_type, str) or not _MEDIA_TYPE_RE.fullmatch(artifact_type):
                raise PolicyError(
                    f"{where}[{i}].artifactType must be a media type like application/spdx+json, "
                    f"not {str(artifact_type)[:80]!r}"
                )
            required.append(RequiredReferrer(artifact_type, self.signed_by(entry, f"{where}[{i}]")))
        return required[0] if len(required) == 1 else AllOf(tuple(required))

    def attestation(self, value: Any, where: str) -> Requirement:
        """``attestation: {predicateType, signedBy}``: a cosign attestation of that type."""
        doc = _mapping(value, where, {"predicateType", "signedBy"})
        predicate_type = doc.get("predicateType")
        if not isinstance(predicate_type, str) or not predicate_type.strip():
            raise PolicyError(f"{where}.predicateType must be a URI like https://spdx.dev/Document")
        return RequiredAttestation(predicate_type, self.signed_by(doc, where, predicate_type))


def _signs_manifest(req: Requirement) -> bool:
    """Whether ``req`` passes only with a cosign or Notation signature of the manifest
    (a Notation one only where every trust statement enforces authenticity: at audit
    anyone's signature passes, at skip none is needed)."""
    if isinstance(req, Leaf):
        if req.format == "notation":
            return getattr(req.verifier, "authenticates", False) is True
        return req.format == "cosign"
    if not isinstance(req, _Composite):
        return False  # required referrers and attestations: signatures of other manifests
    signs = [_signs_manifest(c) for c in req.children]
    return any(signs) if req.every else all(signs)


def _config_unsigned(req: Requirement, *, guarded: bool) -> bool:
    """Whether a modelSigning ``allowImageConfig`` leaf can pass with no signature of
    the manifest beside it in an allOf (a model signature covers no config)."""
    if isinstance(req, Leaf):
        return not guarded and getattr(req.verifier, "allow_image_config", False) is True
    if not isinstance(req, _Composite):
        return False
    return any(
        _config_unsigned(
            child,
            guarded=guarded
            or (req.every and any(_signs_manifest(o) for o in req.children if o is not child)),
        )
        for child in req.children
    )


def _verifier(
    key: Any, spec: Mapping[str, Any], base_dir: Path, trust: TrustConfig, where: str
) -> Verifier:
    # Imported here so a format's heavy dependencies load only when a policy uses it.
    factories = {
        "cosign": ("proxy.verify.cosign", "cosign_verifier_from_spec", True),
        "notation": ("proxy.verify.notation", "notation_verifier_from_spec", False),
        "modelSigning": ("proxy.verify.oms", "oms_verifier_from_spec", True),
    }
    if key not in factories:
        raise PolicyError(
            f"unknown requirement {str(key)[:64]!r} (known: {', '.join(REQUIREMENT_KEYS)})"
        )
    module_name, factory_name, wants_trust = factories[key]
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"{key} verification is not available in this build: {exc}") from exc
    extra = {"trust": trust} if wants_trust else {}
    try:
        return cast(Verifier, factory(spec, base_dir=base_dir, **extra))
    except PolicyError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # A factory that let a loading error through is still a configuration error.
        raise PolicyError(f"cannot load: {exc}") from exc


def _trust(doc: Any, base_dir: Path, material: _Material, where: str) -> TrustConfig:
    doc = _mapping(doc, where, {"sigstoreTrustedRoot"})
    root = doc.get("sigstoreTrustedRoot")
    if root is None:
        return TrustConfig()
    if not isinstance(root, str) or not root:
        raise PolicyError(f"{where}.sigstoreTrustedRoot must be a path")
    path = base_dir / root
    if not path.is_file():
        raise PolicyError(f"{where}.sigstoreTrustedRoot: {path} not found")
    material.add(path, f"{where}.sigstoreTrustedRoot")
    return TrustConfig(sigstore_trusted_root=path.resolve())


def _limits(doc: Any, where: str) -> Limits:
    integers = {
        "maxSignatures": "max_signatures",
        "maxSignatureManifestBytes": "max_signature_manifest_bytes",
        "maxBundleBytes": "max_bundle_bytes",
    }
    doc = _mapping(doc, where, {*integers, "deadlineSeconds"})
    values: dict[str, Any] = {}
    for key, attribute in integers.items():
        if key in doc:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PolicyError(f"{where}.{key} must be a positive integer, not {value!r}")
            values[attribute] = value
    if "deadlineSeconds" in doc:
        deadline = _seconds(doc["deadlineSeconds"], f"{where}.deadlineSeconds")
        if deadline <= 0:
            raise PolicyError(f"{where}.deadlineSeconds must be positive")
        values["deadline_seconds"] = deadline
    return Limits(**values)


def _choice(value: Any, where: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PolicyError(f"{where} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise PolicyError(f"{where} must be a number of seconds >= 0, not {value!r}")
    return float(value)


def _mapping(value: Any, where: str, known: set[str] | None = None) -> dict[str, Any]:
    """``value`` as a mapping; given ``known``, one with no other keys."""
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a mapping, not {type(value).__name__}")
    if known is not None and (unknown := set(map(str, value)) - known):
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return value


class _Material:
    """The trust files a policy names, hashed into its revision.

    Each file is hashed when the policy names it, before its verifier reads it, and
    again by ``digest``: a file that changed in between fails the load, so a revision
    always describes the material its verifiers hold. Directories (a Notation trust
    store) are walked in name order, following links but visiting each directory once.
    """

    def __init__(self, base_dir: Path) -> None:
        self._base_dir = base_dir
        self.paths: dict[Path, None] = {}  # every path named or walked, in order
        self._files: dict[str, tuple[Path, str]] = {}
        self._dirs: set[tuple[int, int]] = set()
        self._bytes = 0

    def add_fields(self, key: str, spec: Mapping[str, Any], where: str) -> None:
        """Add the paths requirement ``key`` names in ``spec`` (see MATERIAL_FIELDS)."""
        for keys in MATERIAL_FIELDS.get(key, ()):
            value: Any = spec
            for name in keys:
                value = value.get(name) if isinstance(value, Mapping) else None
            if isinstance(value, str) and value and "\0" not in value:
                self.add(self._base_dir / value, where)

    def add(self, path: Path, where: str) -> None:
        """Add a file, or every file under a directory; a missing path adds nothing."""
        self.paths[path] = None
        if not os.path.isdir(path):  # False for whatever cannot be stat'ed, too
            self._add_file(path, where)
            return
        for directory, dirnames, filenames in os.walk(path, followlinks=True):
            try:
                st = os.stat(directory)
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in self._dirs:
                dirnames[:] = []  # seen already (a link back up, or a second name)
                continue
            self._dirs.add((st.st_dev, st.st_ino))
            if len(self._dirs) > MAX_MATERIAL_FILES:
                raise PolicyError(f"{where}: names more than {MAX_MATERIAL_FILES} directories")
            dirnames.sort()
            self.paths[Path(directory)] = None
            for name in sorted(filenames):
                self._add_file(Path(directory) / name, where)

    def _add_file(self, path: Path, where: str) -> None:
        key = str(path.relative_to(self._base_dir) if path.is_relative_to(self._base_dir) else path)
        if key in self._files:
            return
        if len(self._files) >= MAX_MATERIAL_FILES:
            raise PolicyError(f"{where}: names more than {MAX_MATERIAL_FILES} trust files")
        try:
            st = path.stat()
        except OSError:
            return  # missing or a dangling link: the verifier that needs it says so
        if not stat.S_ISREG(st.st_mode):
            return  # not a file to hash (a FIFO would block the read)
        self._bytes += st.st_size
        if self._bytes > MAX_MATERIAL_BYTES:
            raise PolicyError(f"{where}: trust material exceeds {MAX_MATERIAL_BYTES} bytes")
        self._files[key] = (path, _file_sha256(path))
        self.paths[path] = None

    def digests(self, raw: bytes) -> tuple[str, str]:
        """(trust digest, revision): sha256 over each trust file's name and content hash,
        without and with ``raw`` before them.

        PolicyError if a file no longer has the content it had when it was named.
        """
        lines = []
        for key in sorted(self._files):
            path, content = self._files[key]
            if _file_sha256(path) != content:
                raise PolicyError(f"trust file {path} changed while the policy was loading")
            lines.append(f"\0{key}\0{content}".encode())
        trust = b"".join(lines)
        return hashlib.sha256(trust).hexdigest(), hashlib.sha256(raw + trust).hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def truncate(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
