"""The OCI error tree.

Every refusal pullgate makes is one of these. Each class is bound to its OCI
error code and HTTP status in exactly one table (``ERROR_TABLE``); call sites raise
the class with a human-readable reason and never choose a status.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OCIError(Exception):
    """Base of every error rendered to a client as OCI error JSON."""

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    @property
    def status(self) -> int:
        return status_for(type(self))

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


class BlobUnknown(OCIError):
    code = "BLOB_UNKNOWN"


class DigestInvalid(OCIError):
    code = "DIGEST_INVALID"


class ManifestInvalid(OCIError):
    code = "MANIFEST_INVALID"


class ManifestUnknown(OCIError):
    code = "MANIFEST_UNKNOWN"


class ManifestTooLarge(ManifestInvalid):
    code = "SIZE_INVALID"


class NameInvalid(OCIError):
    code = "NAME_INVALID"


class NameUnknown(OCIError):
    code = "NAME_UNKNOWN"


class ReferenceInvalid(OCIError):
    """A tag or reference that is neither a valid tag nor a digest."""

    code = "MANIFEST_INVALID"


class PathInvalid(OCIError):
    """A request path that is not part of the distribution API."""

    code = "NAME_INVALID"


class RouteUnknown(OCIError):
    code = "NOT_FOUND"


class Unsupported(OCIError):
    """A write, or another operation a read-only mirror does not offer."""

    code = "UNSUPPORTED"


class RangeNotSatisfiable(OCIError):
    code = "RANGE_INVALID"


class RangeInvalid(OCIError):
    code = "RANGE_INVALID"


class Unauthorized(OCIError):
    code = "UNAUTHORIZED"


class CredentialsRequired(Unauthorized):
    """A private repository asked for without credentials: the HTTP front end adds a
    Basic challenge, so a client that has credentials for it sends them."""


class DeniedWithoutPod(CredentialsRequired):
    """A policy refusal that a scope for some pods might lift: answered
    with a challenge, so containerd pulling for a pod presents the pod's grant."""

    code = "DENIED"


class Denied(OCIError):
    """A policy refusal: the client may not have this content."""

    code = "DENIED"


class VerificationFailed(Denied):
    """A manifest whose signatures fail the node's policy."""


class BlobNotAllowed(Denied):
    """A blob that no verified manifest of the repository references."""


class LayerRefused(Denied):
    """A layer whose files are not what its model's signature lists (per-file check)."""


class TooManyRequests(OCIError):
    code = "TOOMANYREQUESTS"


class UpstreamError(OCIError):
    """The upstream registry answered, but not usefully (5xx, bad body, digest mismatch)."""

    code = "UPSTREAM_ERROR"


class UpstreamUnavailable(OCIError):
    """The upstream registry could not be reached."""

    code = "UPSTREAM_UNAVAILABLE"


class UpstreamTimeout(OCIError):
    code = "UPSTREAM_TIMEOUT"


class UpstreamTooSlow(UpstreamTimeout):
    """A body that kept arriving, but below the minimum transfer rate (``minRate``):
    a drip just inside the read timeout, which would hold a pull for hours."""


class RegistryUnknown(OCIError):
    """``ns=`` names a registry with no configured upstream."""

    code = "NAME_UNKNOWN"


class InternalError(OCIError):
    """A bug in pullgate: neither a refusal nor the upstream's fault.

    The front ends render any unexpected exception as this (after logging it), so a
    bug is never reported as a policy decision or blamed on the upstream registry.
    """

    code = "UNKNOWN"


# The one table binding each error class to its HTTP status. Lookups walk the MRO,
# so a subclass inherits its parent's status unless it is listed itself.
ERROR_TABLE: dict[type[OCIError], int] = {
    OCIError: 500,
    BlobUnknown: 404,
    DigestInvalid: 400,
    ManifestInvalid: 400,
    ManifestTooLarge: 413,
    ManifestUnknown: 404,
    NameInvalid: 400,
    NameUnknown: 404,
    ReferenceInvalid: 400,
    PathInvalid: 400,
    RouteUnknown: 404,
    Unsupported: 405,
    RangeNotSatisfiable: 416,
    RangeInvalid: 400,
    Unauthorized: 401,
    Denied: 403,
    TooManyRequests: 429,
    UpstreamError: 502,
    UpstreamUnavailable: 503,
    UpstreamTimeout: 504,
    RegistryUnknown: 404,
    InternalError: 500,
}


def status_for(cls: type[OCIError]) -> int:
    """The HTTP status bound to an error class (nearest listed ancestor)."""
    for klass in cls.__mro__:
        if klass in ERROR_TABLE:
            return ERROR_TABLE[klass]
    return 500


class StreamAborted(Exception):
    """A blob transfer that must be cut after headers went out.

    Raised when bytes turn out wrong (digest mismatch) or incomplete (upstream
    truncation) mid-stream. The front end aborts the connection, so the client never
    receives a complete body; nothing is cached.
    """
