"""Blob bodies read from a worker thread: straight from a plain-HTTP socket, or through
the event loop; errors leave as OCI errors, never as aiohttp's."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.oci.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.body import BodyReader, LoopBody, SocketBody
from proxy.upstream.client import TAKEOVER_MIN_BYTES, UpstreamResponse

MIB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """A raw HTTP/1.1 server on loopback, answering with whatever a test writes."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/blob"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _headers(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode()


def _read_all(body: BodyReader) -> tuple[str, int]:
    view = memoryview(bytearray(MIB))
    hasher = hashlib.sha256()
    total = 0
    while count := body.readinto(view):
        hasher.update(view[:count])
        total += count
    return hasher.hexdigest(), total


async def _open(
    url: str, idle_timeout: float = 5.0
) -> tuple[aiohttp.ClientSession, UpstreamResponse]:
    session = aiohttp.ClientSession(auto_decompress=False)
    response = await session.get(url)
    return session, UpstreamResponse(response, idle_timeout=idle_timeout)


async def test_a_plain_http_body_is_read_from_the_socket_with_every_byte(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    data = hashlib.sha256(b"x").digest() * (3 * MIB // 32 + 7)

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(len(data)))
        for start in range(0, len(data), 100_000):
            writer.write(data[start : start + 100_000])
            await writer.drain()

    session, response = await _open(await serve(answer))
    try:
        body = response.body_reader()
        assert isinstance(body, SocketBody)
        got = await asyncio.to_thread(_read_all, body)
        body.close()
    finally:
        response.close()
        await session.close()
    assert got == (hashlib.sha256(data).hexdigest(), len(data))


async def test_small_and_chunked_bodies_stay_with_the_event_loop(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    small = b"s" * (TAKEOVER_MIN_BYTES - 1)

    async def answer_small(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(len(small)) + small)

    async def answer_chunked(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(None) + b"5\r\nhello\r\n0\r\n\r\n")

    for answer, expected in ((answer_small, small), (answer_chunked, b"hello")):
        session, response = await _open(await serve(answer))
        try:
            body = response.body_reader()
            assert isinstance(body, LoopBody)
            got = await asyncio.to_thread(_read_all, body)
        finally:
            response.close()
            await session.close()
        assert got == (hashlib.sha256(expected).hexdigest(), len(expected))


async def test_a_chunked_body_of_many_pieces_arrives_whole_and_in_order(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    # Pieces buffered behind one another are joined for the reader thread (iter_body):
    # every byte must still come once, in order, across HTTP chunk boundaries.
    pieces = [hashlib.sha256(str(i).encode()).digest() * (1 + i % 700) for i in range(3000)]

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(None))
        for start in range(0, len(pieces), 500):
            writer.write(
                b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces[start : start + 500])
            )
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    session, response = await _open(await serve(answer))
    try:
        body = response.body_reader()
        assert isinstance(body, LoopBody)
        got = await asyncio.to_thread(_read_all, body)
    finally:
        response.close()
        await session.close()
    expected = b"".join(pieces)
    assert got == (hashlib.sha256(expected).hexdigest(), len(expected))


async def test_refuses_a_body_cut_short_as_an_upstream_error(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(4 * MIB) + b"z" * (2 * MIB))
        await writer.drain()

    session, response = await _open(await serve(answer))
    try:
        body = response.body_reader()
        with pytest.raises(UpstreamError, match="body bytes missing"):
            await asyncio.to_thread(_read_all, body)
        body.close()
    finally:
        response.close()
        await session.close()


async def test_gives_up_on_a_body_that_stalls_after_the_idle_timeout(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    release = asyncio.Event()

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers(4 * MIB) + b"z" * MIB)
        await writer.drain()
        await release.wait()

    session, response = await _open(await serve(answer), idle_timeout=0.5)
    try:
        body = response.body_reader()
        with pytest.raises(UpstreamTimeout, match="sent nothing"):
            await asyncio.to_thread(_read_all, body)
        body.close()
    finally:
        release.set()
        response.close()
        await session.close()
