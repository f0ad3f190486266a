"""The node's signature policy: scopes, modes and requirements, loaded from YAML.

Format (paths are relative to the policy file)::

    default: deny                 # deny | warn | allow, for references no scope matches
    trust:
      sigstoreTrustedRoot: trust/trusted_root.json
    limits: {maxSignatures: 32, maxSignatureManifestBytes: 262144,
             maxBundleBytes: 1048576, deadlineSeconds: 10}
    verdictCache: {positiveTTL: 300, negativeTTL: 30}
    scopes:
      - match: "registry.example.test/models/**"     # glob over registry/repository
        artifactTypes: ["application/vnd.cncf.model.manifest.v1+json"]   # optional
        mode: enforce                                 # enforce | warn | allow
        indexes: coverChildren                        # or eachChild
        require:
          anyOf:                                      # or allOf; nest freely
            - cosign: {key: keys/release.pub}
            - notation: {trustPolicy: notation/trustpolicy.json, trustStore: notation/truststore}
            - modelSigning: {key: keys/model.pub}

Globs: ``*`` matches within one path segment, ``**`` across segments, ``?`` one
character. When several scopes match, the most specific wins: the one with the most
literal characters, then the fewest wildcards, then the first in the file. A scope
with ``artifactTypes`` applies only to manifests of those types.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import yaml

from proxy.gate import ArtifactSource, RepoKey
from proxy.verify.base import CheckResult, Limits, PolicyError, Subject, TrustConfig, Verifier

log = logging.getLogger("pullgate.policy")

Mode = Literal["enforce", "warn", "allow"]
MODES: tuple[Mode, ...] = ("enforce", "warn", "allow")
MAX_REASON = 1500


class Requirement(Protocol):
    def describe(self) -> str:
        """A short label for denials."""

    async def evaluate(
        self, subject: Subject, source: ArtifactSource, limits: Limits
    ) -> CheckResult:
        """Whether the subject satisfies this requirement, with the reason."""


@dataclass(frozen=True, slots=True)
class Leaf:
    verifier: Verifier

    def describe(self) -> str:
        return self.verifier.describe()

    async def evaluate(
        self, subject: Subject, source: ArtifactSource, limits: Limits
    ) -> CheckResult:
        return await self.verifier.verify(subject, source, limits)


@dataclass(frozen=True, slots=True)
class AllOf:
    children: tuple[Requirement, ...]

    def describe(self) -> str:
        return "allOf[" + ", ".join(c.describe() for c in self.children) + "]"

    async def evaluate(
        self, subject: Subject, source: ArtifactSource, limits: Limits
    ) -> CheckResult:
        passed = []
        for child in self.children:
            result = await child.evaluate(subject, source, limits)
            if not result.ok:
                return CheckResult(False, f"allOf failed: {child.describe()}: {result.reason}")
            passed.append(result.reason)
        return CheckResult(True, "; ".join(passed))


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Requirement, ...]

    def describe(self) -> str:
        return "anyOf[" + ", ".join(c.describe() for c in self.children) + "]"

    async def evaluate(
        self, subject: Subject, source: ArtifactSource, limits: Limits
    ) -> CheckResult:
        failures = []
        for child in self.children:
            result = await child.evaluate(subject, source, limits)
            if result.ok:
                return result
            failures.append(f"{child.describe()}: {result.reason}")
        return CheckResult(False, "anyOf failed: " + " | ".join(failures))


@dataclass(frozen=True, slots=True)
class Scope:
    match: str
    mode: Mode
    require: Requirement | None
    artifact_types: frozenset[str] | None = None
    cover_children: bool = True
    order: int = 0
    _regex: re.Pattern[str] = field(default=re.compile(""), repr=False, compare=False)

    @property
    def specificity(self) -> tuple[int, int, int]:
        literal = len(re.sub(r"[*?]", "", self.match))
        wildcards = self.match.count("*") + self.match.count("?")
        return (literal, -wildcards, -self.order)

    def applies(self, name: str, artifact_type: str | None) -> bool:
        if not self._regex.fullmatch(name):
            return False
        return self.artifact_types is None or artifact_type in self.artifact_types

    def label(self) -> str:
        return f'scope "{self.match}" ({self.mode})'


@dataclass(frozen=True, slots=True)
class Policy:
    default: Literal["deny", "warn", "allow"]
    scopes: tuple[Scope, ...]
    limits: Limits
    positive_ttl: float
    negative_ttl: float
    revision: str
    source: str

    def scope_for(self, repo: RepoKey, artifact_type: str | None) -> Scope | None:
        name = f"{repo.registry}/{repo.repository}"
        matching = [s for s in self.scopes if s.applies(name, artifact_type)]
        return max(matching, key=lambda s: s.specificity, default=None)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


# ---- loading ---------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; PolicyError says where and why it is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from exc
    return parse_policy(raw, base_dir=path.resolve().parent, source=str(path))


def parse_policy(raw: bytes, *, base_dir: Path, source: str = "<policy>") -> Policy:
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    where = source
    doc = _mapping(doc, where)
    _known(doc, {"default", "trust", "limits", "verdictCache", "scopes"}, where)
    default = _mode(
        doc.get("default", "deny"), f"{where}: default", allowed=("deny", "warn", "allow")
    )
    trust = _trust(doc.get("trust") or {}, base_dir, f"{where}: trust")
    limits = _limits(doc.get("limits") or {}, f"{where}: limits")
    cache = _mapping(doc.get("verdictCache") or {}, f"{where}: verdictCache")
    _known(cache, {"positiveTTL", "negativeTTL"}, f"{where}: verdictCache")
    positive_ttl = _number(cache.get("positiveTTL", 300), f"{where}: verdictCache.positiveTTL")
    negative_ttl = _number(cache.get("negativeTTL", 30), f"{where}: verdictCache.negativeTTL")
    raw_scopes = doc.get("scopes") or []
    if not isinstance(raw_scopes, list):
        raise PolicyError(f"{where}: scopes must be a list")
    scopes = tuple(
        _scope(item, order, base_dir, trust, f"{where}: scopes[{order}]")
        for order, item in enumerate(raw_scopes)
    )
    return Policy(
        default=default,
        scopes=scopes,
        limits=limits,
        positive_ttl=positive_ttl,
        negative_ttl=negative_ttl,
        revision=hashlib.sha256(raw).hexdigest()[:16],
        source=source,
    )


def _scope(item: Any, order: int, base_dir: Path, trust: TrustConfig, where: str) -> Scope:
    item = _mapping(item, where)
    _known(item, {"match", "artifactTypes", "mode", "require", "indexes"}, where)
    match = item.get("match")
    if not isinstance(match, str) or not match or len(match) > 512:
        raise PolicyError(f"{where}.match must be a non-empty glob like 'registry/repo/**'")
    mode = _mode(item.get("mode", "enforce"), f"{where}.mode", allowed=MODES)
    types = item.get("artifactTypes")
    artifact_types: frozenset[str] | None = None
    if types is not None:
        if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
            raise PolicyError(f"{where}.artifactTypes must be a non-empty list of media types")
        artifact_types = frozenset(types)
    indexes = item.get("indexes", "coverChildren")
    if indexes not in ("coverChildren", "eachChild"):
        raise PolicyError(f"{where}.indexes must be coverChildren or eachChild")
    require_doc = item.get("require")
    if require_doc is None and mode != "allow":
        raise PolicyError(f"{where}.require is missing (only mode: allow may omit it)")
    require = (
        _requirement(require_doc, base_dir, trust, f"{where}.require")
        if require_doc is not None
        else None
    )
    if mode == "allow":
        log.warning("policy %s: mode allow opts %s out of signature verification", where, match)
    return Scope(
        match=match,
        mode=mode,
        require=require,
        artifact_types=artifact_types,
        cover_children=indexes == "coverChildren",
        order=order,
        _regex=glob_to_regex(match),
    )


def _requirement(doc: Any, base_dir: Path, trust: TrustConfig, where: str) -> Requirement:
    doc = _mapping(doc, where)
    if len(doc) != 1:
        raise PolicyError(
            f"{where} must have exactly one key (anyOf, allOf, cosign, notation, modelSigning)"
        )
    ((key, value),) = doc.items()
    if key in ("anyOf", "allOf"):
        if not isinstance(value, list):
            raise PolicyError(f"{where}.{key} must be a list")
        if not value:
            raise PolicyError(f"{where}.{key} is empty: an empty list would allow nothing")
        children = tuple(
            _requirement(child, base_dir, trust, f"{where}.{key}[{i}]")
            for i, child in enumerate(value)
        )
        return AnyOf(children) if key == "anyOf" else AllOf(children)
    spec = _mapping(value, f"{where}.{key}")
    try:
        return Leaf(_verifier(key, spec, base_dir, trust, where))
    except PolicyError as exc:
        raise PolicyError(f"{where}.{key}: {exc}") from exc


def _verifier(
    key: str, spec: Mapping[str, Any], base_dir: Path, trust: TrustConfig, where: str
) -> Verifier:
    # Imported here so a format's heavy dependencies load only when a policy uses it.
    factories = {
        "cosign": ("proxy.verify.cosign", "cosign_verifier_from_spec", True),
        "notation": ("proxy.verify.notation", "notation_verifier_from_spec", False),
        "modelSigning": ("proxy.verify.oms", "oms_verifier_from_spec", True),
    }
    if key not in factories:
        raise PolicyError(
            f"{where}: unknown requirement {key!r} (anyOf, allOf, cosign, notation, modelSigning)"
        )
    module_name, factory_name, wants_trust = factories[key]
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"{key} verification is not available in this build: {exc}") from exc
    if wants_trust:
        return cast(Verifier, factory(spec, base_dir=base_dir, trust=trust))
    return cast(Verifier, factory(spec, base_dir=base_dir))


def _trust(doc: Any, base_dir: Path, where: str) -> TrustConfig:
    doc = _mapping(doc, where)
    _known(doc, {"sigstoreTrustedRoot"}, where)
    root = doc.get("sigstoreTrustedRoot")
    if root is None:
        return TrustConfig()
    if not isinstance(root, str):
        raise PolicyError(f"{where}.sigstoreTrustedRoot must be a path")
    path = (base_dir / root).resolve()
    if not path.is_file():
        raise PolicyError(f"{where}.sigstoreTrustedRoot: {path} not found")
    return TrustConfig(sigstore_trusted_root=path)


def _limits(doc: Any, where: str) -> Limits:
    doc = _mapping(doc, where)
    names = {
        "maxSignatures": "max_signatures",
        "maxSignatureManifestBytes": "max_signature_manifest_bytes",
        "maxBundleBytes": "max_bundle_bytes",
        "deadlineSeconds": "deadline_seconds",
    }
    _known(doc, set(names), where)
    values: dict[str, Any] = {}
    for key, attribute in names.items():
        if key in doc:
            number = _number(doc[key], f"{where}.{key}")
            values[attribute] = number if attribute == "deadline_seconds" else int(number)
    return Limits(**values)


def _mode(value: Any, where: str, *, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise PolicyError(f"{where} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PolicyError(f"{where} must be a positive number, not {value!r}")
    return float(value)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a mapping")
    return value


def _known(doc: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(map(str, doc)) - known
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")


def truncate(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
