"""The one way pullgate opens its upstream HTTP session."""

from __future__ import annotations

import aiohttp


def new_upstream_session() -> aiohttp.ClientSession:
    """A session that hands containerd the registry's bytes untouched (no decompression,
    and ``Accept-Encoding: identity``: a CDN that gzipped a blob on the way would change
    the bytes its digest names), reads in big buffers, ignores proxy environment
    variables, and keeps no cookies:
    cookies ignore ports and cross subdomains, so a jar would hand the origin's cookies
    to an untrusted transport (and let a transport plant its own on the origin)."""
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        read_bufsize=4 * 1024 * 1024,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"Accept-Encoding": "identity"},
    )
