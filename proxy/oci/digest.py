"""Content digests (``algorithm:hex``), as the OCI image spec defines them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from proxy.oci.errors import DigestInvalid

# Only sha256 and sha512 are registered algorithms; anything else is refused rather
# than passed upstream, so a hostile digest can never reach a path or a cache key.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_MAX_DIGEST_LENGTH = 7 + 1 + 128


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate ``sha256:<64 lowercase hex>`` (or sha512)."""
        if len(text) > _MAX_DIGEST_LENGTH:
            raise DigestInvalid(f"digest is too long ({len(text)} characters)")
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise DigestInvalid(f"malformed digest {text[:80]!r}")
        algorithm, encoded = match.group(1), match.group(2)
        expected = _HEX_LENGTH.get(algorithm)
        if expected is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != expected or not _is_lower_hex(encoded):
            raise DigestInvalid(f"{algorithm} digest must be {expected} lowercase hex characters")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex

    @property
    def fallback_tag(self) -> str:
        """The OCI referrers fallback tag ``<alg>-<hex>``."""
        return f"{self.algorithm}-{self.hex}"


def _is_lower_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def is_digest(text: str) -> bool:
    return ":" in text
