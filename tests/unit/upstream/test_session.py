"""The upstream session asks for the registry's bytes as they are."""

from __future__ import annotations

import asyncio

from proxy.upstream.session import new_upstream_session


async def test_refuses_content_codings_so_a_blob_arrives_as_its_digest_names_it() -> None:
    # aiohttp would offer gzip and deflate on its own; a CDN that took the offer would
    # hand pullgate other bytes than the blob's (and fail every digest check).
    seen: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("accept-encoding:"):
                seen.append(line.split(":", 1)[1].strip())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = new_upstream_session()
    try:
        async with session.get(f"http://127.0.0.1:{port}/v2/") as response:
            assert await response.read() == b"ok"
    finally:
        await session.close()
        server.close()
        await server.wait_closed()
    assert seen == ["identity"]
