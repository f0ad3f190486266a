"""The gRPC side of the error table: every OCI error has a definite gRPC code."""

from __future__ import annotations

import grpc
import pytest

from proxy.cri.gen.runtime.v1 import api_pb2
from proxy.cri.server import GRPC_CODE_FOR_STATUS, grpc_code_for
from proxy.oci import errors


def _all_error_classes() -> list[type[errors.OCIError]]:
    seen: list[type[errors.OCIError]] = []
    stack: list[type[errors.OCIError]] = [errors.OCIError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            seen.append(sub)
            stack.append(sub)
    return seen


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_oci_error_maps_to_a_definite_grpc_code(cls: type[errors.OCIError]) -> None:
    error = cls("reason")
    code = grpc_code_for(error)
    # Bound in the table, not left to the fallback.
    assert error.status in GRPC_CODE_FOR_STATUS
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
    if issubclass(cls, errors.InternalError):
        assert code is grpc.StatusCode.INTERNAL
    else:
        # Only a bug is INTERNAL: a refusal or an upstream problem never looks like one.
        assert code is not grpc.StatusCode.INTERNAL


def test_internal_error_is_500_unknown_and_grpc_internal() -> None:
    error = errors.InternalError("bug")
    assert (error.status, error.code) == (500, "UNKNOWN")
    assert error.to_json() == {"errors": [{"code": "UNKNOWN", "message": "bug"}]}
    assert grpc_code_for(error) is grpc.StatusCode.INTERNAL


def test_denials_are_permission_denied_and_upstream_outages_unavailable() -> None:
    assert grpc_code_for(errors.VerificationFailed("x")) is grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code_for(errors.BlobNotAllowed("x")) is grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code_for(errors.UpstreamUnavailable("x")) is grpc.StatusCode.UNAVAILABLE
    assert grpc_code_for(errors.UpstreamTimeout("x")) is grpc.StatusCode.DEADLINE_EXCEEDED


def test_subset_messages_keep_unknown_fields_across_a_round_trip() -> None:
    # A PodSandboxConfig field pullgate does not declare (dns_config = 4) must survive,
    # so forwarding kubelet's request to containerd loses nothing.
    dns_config = bytes([0x22, 0x05, 0x0A, 0x03]) + b"1.1"  # field 4, servers = "1.1"
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="a/b:c"))
    raw = request.SerializeToString() + bytes([0x1A, len(dns_config)]) + dns_config
    parsed = api_pb2.PullImageRequest.FromString(raw)
    assert parsed.image.image == "a/b:c"
    assert parsed.SerializeToString() == raw
