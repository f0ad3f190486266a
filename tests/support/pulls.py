"""Pulling a blob from a running pullgate the way the cache tests check it."""

from __future__ import annotations

import hashlib
import http.client

from tests.support.peers import Pullgate


def fetch(pullgate: Pullgate, path: str) -> tuple[int, str, int]:
    """GET ``path``; (status, sha256 of the body, bytes received) without keeping it.

    A connection cut mid-body ends the count there; one refused or reset before an
    answer is status 0.
    """
    host, port = pullgate.host.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    hasher = hashlib.sha256()
    received = 0
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        try:
            while chunk := response.read(1 << 20):
                hasher.update(chunk)
                received += len(chunk)
        except (http.client.IncompleteRead, ConnectionError):
            pass
        return response.status, "sha256:" + hasher.hexdigest(), received
    except ConnectionError:
        return 0, "", received
    finally:
        conn.close()
