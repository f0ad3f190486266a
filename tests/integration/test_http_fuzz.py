"""HTTP-level fuzzing of request paths, queries and headers against a running pullgate:
never a 500 or a hang, and every refusal is OCI error JSON with a reason."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.support import counts
from tests.support.fuzzseed import SEED
from tests.support.peers import Pullgate, Registry

pytestmark = pytest.mark.integration
REGISTRY = "registry.example.test"
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
SEGMENTS = st.sampled_from(
    ["v2", "a", "library", "manifests", "blobs", "tags", "list", "referrers", "uploads",
     "..", ".", "%2e%2e", "%2F", "sha256:" + "a" * 64, "md5:00", "latest", "", "x" * 300]
)  # fmt: skip
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=8).map(lambda parts: "/v2/" + "/".join(parts)),
    st.text(PRINTABLE, max_size=200).map(lambda text: "/" + text),
)
QUERIES = st.one_of(
    st.just(""),
    st.sampled_from([f"ns={REGISTRY}", "ns=", "ns=..%2f", "ns=evil.test", "n=1&ns=a&ns=b"]),
    st.text(PRINTABLE, max_size=120),
)


@pytest.fixture(scope="module")
def pullgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pullgate]:
    work = tmp_path_factory.mktemp("httpfuzz")
    registry = Registry(work / "registry").start()
    peer = Pullgate(work / "pullgate", upstreams={REGISTRY: registry.url})
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()
        registry.stop()


def _request(
    pullgate: Pullgate, method: str, target: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    host, port = pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@seed(SEED)
@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "HEAD", "GET", "PUT", "DELETE", "OPTIONS"]),
    path=PATHS,
    query=QUERIES,
    range_header=st.one_of(st.none(), st.text(PRINTABLE, max_size=40)),
)
def test_fuzz_requests_never_crash_and_refuse_with_oci_errors(
    pullgate: Pullgate, method: str, path: str, query: str, range_header: str | None
) -> None:
    counts.add("http fuzz requests")
    target = path + ("?" + query if query else "")
    headers = {"Range": range_header} if range_header is not None else {}
    status, body = _request(pullgate, method, target, headers)
    assert status != 500 and status < 600, (status, target)
    if status >= 400 and method != "HEAD":
        error = json.loads(body)["errors"][0]
        assert error["code"] and error["message"], target


def test_fuzz_left_pullgate_serving(pullgate: Pullgate) -> None:
    status, _ = _request(pullgate, "GET", "/v2/", {})
    assert status == 200
