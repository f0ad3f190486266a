"""Registry token auth: challenges, credentials, and the trust boundary.

Two identities reach an upstream: the node's (its docker config, or anonymous) and a
requester's (a pod's pull secret handed over by kubelet, or a mirror client's
``Authorization``), which a request acts under through ``acting_as``.

Credentials are sent only to hosts inside the upstream's trust boundary: the upstream
host itself, or a token realm host the operator listed for that upstream. A realm
that points anywhere else gets an anonymous token request, never a password.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from proxy.oci.reference import without_https_port

_PARAM_RE = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')
MAX_CHALLENGE_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class Credentials:
    """One identity at a registry: a username and password, an identity token (an
    OAuth2 refresh token, exchanged at the token realm) or a registry token (a bearer
    token sent as is)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:  # never print a secret into a log line
        return f"Credentials(username={self.username!r}, fingerprint={self.fingerprint[:12]})"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    @property
    def fingerprint(self) -> str:
        """A digest of the whole identity: what caches are keyed by, never the secret."""
        parts = (self.username, self.password, self.identity_token, self.registry_token)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def credentials_from_parts(
    *,
    username: str = "",
    password: str = "",
    auth: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> Credentials | None:
    """Credentials as kubelet hands them over (CRI ``AuthConfig``), or None if empty.

    ``auth`` is base64 of ``user:password``, used when no username is given.
    """
    if not username and auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            username, sep = "", ""
        if not sep:
            raise ValueError("the auth field is not base64 of user:password")
    if username or password or identity_token or registry_token:
        return Credentials(username, password, identity_token, registry_token)
    return None


def credentials_from_header(header: str | None) -> Credentials | None:
    """A mirror client's ``Authorization``: Basic user/password, or a Bearer token."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic" and value:
        return credentials_from_parts(auth=value)
    if scheme.lower() == "bearer" and value:
        return Credentials(registry_token=value)
    raise ValueError(f"unsupported Authorization scheme {scheme[:20]!r}")


_ACTING_AS: contextvars.ContextVar[Credentials | None] = contextvars.ContextVar(
    "pullgate_acting_as", default=None
)


@contextlib.contextmanager
def acting_as(credentials: Credentials | None) -> Iterator[None]:
    """Upstream requests made within (and by tasks started within) use
    ``credentials`` instead of the node's; None keeps the node's."""
    token = _ACTING_AS.set(credentials)
    try:
        yield
    finally:
        _ACTING_AS.reset(token)


def requester_credentials() -> Credentials | None:
    """The requester's credentials this request acts under, if any."""
    return _ACTING_AS.get()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lower-cased
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` challenge. Returns None if unusable."""
    if not header or len(header) > MAX_CHALLENGE_LENGTH:
        return None
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if match is None or match.end() == position:
            return None if scheme == "bearer" else Challenge(scheme, params)
        key = match.group(1).lower()
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[key] = re.sub(r"\\(.)", r"\1", value or "")
        position = match.end()
    return Challenge(scheme, params)


def realm_is_trusted(realm: str, upstream_url: str, extra_hosts: tuple[str, ...]) -> bool:
    """Whether node credentials may be sent to a token realm.

    The realm must be http(s); its host must be the upstream's host or one the
    operator listed; and it must not downgrade an https upstream to plain http.
    """
    try:
        realm_parts = urlsplit(realm)
        upstream_parts = urlsplit(upstream_url)
    except ValueError:
        return False
    if realm_parts.scheme not in ("http", "https") or not realm_parts.hostname:
        return False
    if upstream_parts.scheme == "https" and realm_parts.scheme != "https":
        return False
    if realm_parts.username or realm_parts.password:
        return False
    realm_host = realm_parts.hostname.lower()
    allowed = {(upstream_parts.hostname or "").lower(), *(h.lower() for h in extra_hosts)}
    return realm_host in allowed


def realm_is_fetchable(realm: str) -> bool:
    try:
        parts = urlsplit(realm)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def load_docker_config(path: Path) -> dict[str, Credentials]:
    """Read node credentials from a docker ``config.json`` (``auths`` section).

    Keys are normalised to bare registry hosts; Docker Hub's legacy key
    ``https://index.docker.io/v1/`` maps to ``docker.io``.
    """
    doc = json.loads(path.read_text())
    auths = doc.get("auths") if isinstance(doc, dict) else None
    out: dict[str, Credentials] = {}
    if not isinstance(auths, dict):
        return out
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        creds = _entry_credentials(entry)
        if creds is not None:
            out[normalise_registry_key(str(key))] = creds
    return out


def _entry_credentials(entry: dict[str, object]) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        name, sep, secret = decoded.partition(":")
        return Credentials(name, secret) if sep else None
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str):
        return Credentials(user, password)
    return None


def normalise_registry_key(key: str) -> str:
    host = key
    if "://" in host:
        host = urlsplit(host).netloc
    host = without_https_port(host.split("/", 1)[0].lower())
    if host in ("index.docker.io", "registry-1.docker.io"):
        return "docker.io"
    return host


def pull_scope(upstream_repository: str) -> str:
    """The token scope for reading ``upstream_repository``."""
    return f"repository:{upstream_repository}:pull"
