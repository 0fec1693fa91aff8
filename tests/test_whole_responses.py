"""Small responses that arrive whole are written by the sidecar itself (whole_response.py):
the caller must not be able to tell them from the ones aiohttp's response writes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.http import SERVER_SOFTWARE

from tests.conftest import SidecarFactory, raw_exchange, route_yaml

BODY = b"hello"


class Answering:
    """A raw upstream answering every request the same way, counting its answers."""

    def __init__(self, framing: bytes, extra: bytes = b"") -> None:
        self.answer = b"HTTP/1.1 201 Made Here\r\nX-A: 1\r\n" + extra + framing
        self.answered = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            self.answered += 1
            await writer.drain()


WHOLE = b"Content-Length: 5\r\n\r\n" + BODY  # framed by length: written by whole_response.py
CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY + b"\r\n0\r\n\r\n"  # left to aiohttp's response


def fields_of(answer: bytes) -> list[tuple[str, str]]:
    """The status line and header fields, names lower-cased."""
    lines = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    pairs = [line.split(": ", 1) for line in lines[1:]]
    return [("status", lines[0])] + [(name.lower(), value) for name, value in pairs]


def comparable(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Without the fields that differ by framing, by request or by the clock."""
    varying = {"content-length", "transfer-encoding", "date", "x-request-id", "x-sidecar-upstream-ms"}
    return [(name, value) for name, value in fields if name not in varying]


@pytest.mark.parametrize(("upstream_sends", "caller_sees"), [
    (b"", [("server", SERVER_SOFTWARE)]),
    (b"Content-Type: text/plain\r\nServer: up/1\r\nX-Request-Id: up-7\r\n",
     [("content-type", "text/plain"), ("server", "up/1"), ("x-request-id", "up-7")]),
])
async def test_a_whole_response_carries_the_head_aiohttp_would_have_sent(
    sidecar_factory: SidecarFactory, raw_upstream, upstream_sends: bytes, caller_sees: list[tuple[str, str]]
) -> None:
    whole = await raw_upstream(Answering(WHOLE, upstream_sends))
    chunked = await raw_upstream(Answering(CHUNKED, upstream_sends))
    by_us = await sidecar_factory(route_yaml(f"http://127.0.0.1:{whole}"))
    by_aiohttp = await sidecar_factory(route_yaml(f"http://127.0.0.1:{chunked}"))
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ours = await raw_exchange(by_us.port, request)
    theirs = await raw_exchange(by_aiohttp.port, request)
    assert ours.endswith(b"\r\n\r\n" + BODY)
    assert comparable(fields_of(ours)) == comparable(fields_of(theirs))
    fields = fields_of(ours)
    for field in [*caller_sees, ("content-length", "5"), ("x-sidecar-attempts", "1"), ("connection", "close")]:
        assert field in fields, field
    assert [name for name, _ in fields].count("x-request-id") == 1
    assert [name for name, _ in fields].count("date") == 1
    # No representation metadata is invented: an answer without a Content-Type stays without one.
    assert [name for name, _ in fields].count("content-type") == (b"Content-Type" in upstream_sends)


async def test_whole_responses_keep_the_connection_open_for_the_next_request(
    sidecar_factory: SidecarFactory, raw_upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(Answering(WHOLE))}"))
    pipelined = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(proxy.port, pipelined)
    assert answer.count(b"HTTP/1.1 201 Made Here\r\n") == 3
    assert answer.count(b"Connection: close") == 1
    assert answer.endswith(b"\r\n\r\n" + BODY)


async def test_a_caller_that_stops_reading_holds_back_its_pipelined_requests(
    sidecar_factory: SidecarFactory, raw_upstream
) -> None:
    # Without backpressure the sidecar would fetch every answer and buffer them all in memory.
    big = b"b" * 16_000  # arrives whole; 400 of them overflow the kernel buffers (4 MiB at most)
    upstream = Answering(b"Content-Length: %d\r\n\r\n" % len(big) + big)
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(upstream)}"))
    count = 400
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * (count - 1)
                     + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # long enough to answer all 400 (about 40 ms), were nothing holding it
        held_at = upstream.answered
        async with asyncio.timeout(10):
            answer = await reader.read(-1)
    finally:
        writer.close()
    assert held_at < count
    assert upstream.answered == count
    assert answer.count(b"HTTP/1.1 201 Made Here\r\n") == count
    assert len(answer.split(b"\r\n\r\n" + big)) == count + 1
