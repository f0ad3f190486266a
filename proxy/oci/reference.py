"""Repository names, tags and distribution API paths.

Everything hostile arrives here first: request paths, ``ns=`` values, references.
The grammar is the OCI distribution spec's; anything outside it is refused with a
``NameInvalid``/``ReferenceInvalid``/``DigestInvalid`` before it reaches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote

from proxy.oci.digest import Digest
from proxy.oci.errors import (
    NameInvalid,
    PathInvalid,
    ReferenceInvalid,
    RouteUnknown,
)

# Distribution spec: <name> is path components of [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
# Always fullmatch: ``$`` alone also matches before a final newline.
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
# Registry host names as containerd writes them in ns= (host, optional port).
_REGISTRY_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
    r"(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?$"
)
MAX_NAME_LENGTH = 255
MAX_PATH_LENGTH = 2048


def validate_repository(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise ``NameInvalid``."""
    if not name:
        raise NameInvalid("repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    for component in name.split("/"):
        if not _COMPONENT_RE.fullmatch(component):
            raise NameInvalid(
                f"invalid repository name component {component[:64]!r}: components are "
                "lowercase alphanumerics separated by '.', '_', '__' or '-'"
            )
    return name


def validate_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise ReferenceInvalid(f"invalid tag {tag[:140]!r}")
    return tag


def validate_registry(registry: str) -> str:
    if len(registry) > 255 or not _REGISTRY_RE.fullmatch(registry):
        raise NameInvalid(f"invalid registry name {registry[:80]!r} in ns=")
    return registry.lower()


@dataclass(frozen=True, slots=True)
class ManifestRef:
    """A manifest reference inside a repository: a tag or a digest, never both."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ManifestRef:
        if ":" in text:
            return cls(digest=Digest.parse(text))
        return cls(tag=validate_tag(text))

    def __str__(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)


class Endpoint(Enum):
    BASE = "base"
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class DistributionPath:
    """A parsed ``/v2/...`` request path."""

    endpoint: Endpoint
    repository: str = ""
    reference: ManifestRef | None = None
    digest: Digest | None = None


def parse_distribution_path(raw_path: str) -> DistributionPath:
    """Parse a raw (still percent-encoded) request path of the read API.

    Percent-encoding is refused outright: no valid name, tag or digest needs it,
    and decoding it is how ``%2e%2e`` traversals get past naive checks.
    """
    if len(raw_path) > MAX_PATH_LENGTH:
        raise PathInvalid(f"request path is longer than {MAX_PATH_LENGTH} characters")
    if "%" in raw_path:
        raise PathInvalid(
            f"percent-encoded characters are not allowed in registry paths: "
            f"{unquote(raw_path)[:120]!r}"
        )
    if raw_path in ("/v2", "/v2/"):
        return DistributionPath(Endpoint.BASE)
    if not raw_path.startswith("/v2/"):
        raise RouteUnknown(f"no such API path: {raw_path[:120]!r}")
    parts = raw_path[len("/v2/") :].split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PathInvalid(f"empty, '.' or '..' path segment in {raw_path[:120]!r}")
    # The repository name may itself contain slashes, so match the suffix.
    if len(parts) >= 3 and parts[-2] == "manifests":
        repo = validate_repository("/".join(parts[:-2]))
        return DistributionPath(Endpoint.MANIFEST, repo, reference=ManifestRef.parse(parts[-1]))
    if len(parts) >= 3 and parts[-2] == "blobs":
        if parts[-1] == "uploads":
            raise RouteUnknown("blob uploads are not offered by a read-only mirror")
        repo = validate_repository("/".join(parts[:-2]))
        return DistributionPath(Endpoint.BLOB, repo, digest=Digest.parse(parts[-1]))
    if len(parts) >= 3 and parts[-2] == "tags" and parts[-1] == "list":
        repo = validate_repository("/".join(parts[:-2]))
        return DistributionPath(Endpoint.TAGS, repo)
    if len(parts) >= 3 and parts[-2] == "referrers":
        repo = validate_repository("/".join(parts[:-2]))
        return DistributionPath(Endpoint.REFERRERS, repo, digest=Digest.parse(parts[-1]))
    if len(parts) >= 4 and parts[-3] == "blobs" and parts[-2] == "uploads":
        raise RouteUnknown("blob uploads are not offered by a read-only mirror")
    raise RouteUnknown(f"no such API path: {raw_path[:120]!r}")


DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def upstream_repository(registry: str, repository: str) -> str:
    """The repository name as the upstream knows it.

    Docker Hub stores single-name repositories under ``library/``.
    """
    if registry in DOCKER_HUB_ALIASES and "/" not in repository:
        return f"library/{repository}"
    return repository


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A full reference ``registry/repository[:tag][@digest]`` as users type it."""

    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str, *, default_registry: str = DOCKER_HUB) -> ImageReference:
        if len(text) > MAX_PATH_LENGTH:
            raise ReferenceInvalid("reference is too long")
        name, digest = text, None
        if "@" in text:
            name, _, digest_text = text.partition("@")
            digest = Digest.parse(digest_text)
        tag = None
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, _, tag = name.rpartition(":")
            validate_tag(tag)
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = validate_registry(first), rest
        else:
            registry, repository = default_registry, name
        validate_repository(repository)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def reference(self) -> ManifestRef:
        if self.digest is not None:
            return ManifestRef(digest=self.digest)
        return ManifestRef(tag=self.tag)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
