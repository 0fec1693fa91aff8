"""Slow clients hold only their own connections, never a route's concurrency slots.

Attackers are raw sockets on loopback: slow bodies announce 8 KiB and send a few bytes;
slow readers ask for a 128 KiB answer and never read. A slow reader's socket has a tiny
receive buffer and segment size, so the sidecar's kernel takes only ~30 KiB of the answer
and the rest waits in the sidecar's own write buffer (on loopback the kernel would take
megabytes, and nothing would back up).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Gate, Hit, RunningSidecar, SidecarFactory, Upstream, wait_until

BIG = bytes(range(256)) * 512  # 128 KiB: more than the kernel takes for a slow reader, less than response_buffer


class Opener(Protocol):
    def __call__(self, port: int, first: bytes, slow_reader: bool = False) -> Awaitable[socket.socket]: ...


async def big(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    return web.Response(body=BIG)


async def big_chunked(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for start in range(0, len(BIG), 16 * 1024):
        await response.write(BIG[start:start + 16 * 1024])
    return response


class Paced:
    """BIG chunked in two parts, the second once the test says so: the relay then surely
    streams chunk by chunk (the body was not all there with the headers)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def __call__(self, request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(BIG[:16 * 1024])
        async with asyncio.timeout(10):
            await self.go.wait()
        self.go.clear()  # for the next request
        await response.write(BIG[16 * 1024:])
        return response


def serve_big(upstream: Upstream) -> Paced:
    """/big whole with a Content-Length, /big-chunked chunked, /big-paced chunked in two parts."""
    paced = Paced()
    upstream.on("/big", big)
    upstream.on("/big-chunked", big_chunked)
    upstream.on("/big-paced", paced)
    return paced


async def first_bytes_reached(reader: socket.socket, paced: Paced) -> None:
    """The answer has started to reach `reader`; a paced upstream may now send the rest."""
    await wait_until(lambda: has_bytes_waiting(reader))
    paced.go.set()


def limited(upstream: Upstream, max_concurrent: int, server: str = "{}") -> str:
    return f"""
        server: {server}
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: up
            limits: {{max_concurrent: {max_concurrent}}}
    """


@pytest.fixture
async def attackers() -> AsyncIterator[Opener]:
    """open(port, first_bytes, slow_reader=...) -> a connected raw socket; all closed at the end."""
    sockets: list[socket.socket] = []
    loop = asyncio.get_running_loop()

    async def open_(port: int, first: bytes, slow_reader: bool = False) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        if slow_reader:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, first)
        return sock

    yield open_
    for sock in sockets:
        sock.close()


def slow_body(path: str = "/upload") -> bytes:
    """Headers promising 8 KiB, then 10 bytes of it: the rest never comes."""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 8192\r\n\r\n".encode() + b"a" * 10


def get(path: str, close: bool = False) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()


def has_bytes_waiting(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


async def read_to_end(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the sidecar sends until it closes the connection (a reset counts as the end)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(limit):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def dechunk(data: bytes) -> bytes:
    body = bytearray()
    for _ in range(len(data)):
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        body += data[:size]
        data = data[size + 2:]
    return bytes(body)


def in_flight(proxy: RunningSidecar) -> float:
    return proxy.metric("sidecar_in_flight_requests", route="main")


async def served_normally(client: aiohttp.ClientSession, proxy: RunningSidecar, count: int) -> None:
    """A normal GET and POST to the attacked route get their answers, `count` times each."""
    for number in range(count):
        async with client.get(f"{proxy.url}/normal/{number}") as response:
            assert (response.status, await response.text()) == (200, f"GET /normal/{number}")
        async with client.post(f"{proxy.url}/form/{number}", data=b"x" * 1000) as response:
            assert (response.status, await response.text()) == (200, f"POST /form/{number}")


async def until_served(client: aiohttp.ClientSession, proxy: RunningSidecar, limit: float = 5.0) -> None:
    """The first normal request that gets through (slots of attackers' requests whose answers
    are still on their way from the upstream are legitimately busy for a moment)."""
    async with asyncio.timeout(limit):
        while True:
            async with client.get(proxy.url + "/normal/first") as response:
                await response.read()
                if response.status == 200:
                    return
            await asyncio.sleep(0.02)


async def test_slow_bodies_hold_no_slot_and_normal_requests_are_served(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener
) -> None:
    proxy = await sidecar_factory(limited(upstream, 4))
    for _ in range(8):  # twice the route's slots
        await attackers(proxy.port, slow_body())
    await wait_until(lambda: in_flight(proxy) == 8)  # every one is in, waiting for its body
    await served_normally(client, proxy, 5)
    assert upstream.hits_for("/upload") == []  # nothing of a trickling body goes upstream
    assert [hit.body for hit in upstream.hits if hit.method == "POST"] == [b"x" * 1000] * 5
    assert proxy.metric("sidecar_limit_rejections_total", route="main", limit="concurrent") == 0


BIG_PATHS = ["/big", "/big-chunked", "/big-paced"]


@pytest.mark.parametrize("path", BIG_PATHS)
async def test_slow_readers_hold_no_slot_and_their_upstream_connections_go_back_to_the_pool(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener,
    path: str,
) -> None:
    paced = serve_big(upstream)
    proxy = await sidecar_factory(limited(upstream, 4))
    for _ in range(8):  # twice the route's slots, one after the other: each slot comes back
        await first_bytes_reached(await attackers(proxy.port, get(path), slow_reader=True), paced)
    assert len(upstream.hits_for(path)) == 8
    await until_served(client, proxy)
    await served_normally(client, proxy, 5)
    assert in_flight(proxy) == 8  # the readers are still being answered
    # The readers' upstream connections were pooled while they still read: normal requests reuse them.
    assert upstream.hits_for("/normal/0")[0].peer in {hit.peer for hit in upstream.hits_for(path)}


async def test_a_small_body_that_stalls_gets_408_after_body_timeout_and_is_never_forwarded(
    sidecar_factory: SidecarFactory, upstream: Upstream, attackers: Opener
) -> None:
    proxy = await sidecar_factory(limited(upstream, 4, "{body_timeout: 200ms}"))
    caller = await attackers(proxy.port, slow_body())
    answer = await read_to_end(caller, limit=5)  # the sidecar closes the connection after answering
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"x-sidecar-error: request_timeout" in head
    assert b"Connection: close" in head
    assert b"0.2s" in body
    assert upstream.hits == []
    assert proxy.metric("sidecar_requests_total", route="main", method="POST", code="408") == 1


async def test_body_timeout_is_reloaded_with_the_config(
    sidecar_factory: SidecarFactory, upstream: Upstream, attackers: Opener, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(limited(upstream, 4, "{body_timeout: 1h}"), config_file=path)
    path.write_text(path.read_text().replace("body_timeout: 1h", "body_timeout: 200ms"))
    await proxy.sidecar.reload_from_file()
    answer = await read_to_end(await attackers(proxy.port, slow_body()), limit=5)
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_reader_that_takes_nothing_for_send_timeout_is_disconnected(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener
) -> None:
    upstream.on("/big", big)
    proxy = await sidecar_factory(limited(upstream, 4, "{send_timeout: 300ms}"))
    reader = await attackers(proxy.port, get("/big"), slow_reader=True)
    await wait_until(lambda: len(upstream.hits_for("/big")) == 1)
    await wait_until(lambda: in_flight(proxy) == 0)  # its request ended without the caller reading
    received = await read_to_end(reader)  # what the kernels held, then the end
    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(received) < len(BIG)  # cut off: the rest was dropped, not kept for the caller
    (cut_off,) = [line for line in proxy.access_log() if line["path"] == "/big"]
    assert (cut_off["status"], cut_off["error"]) == (200, "caller_too_slow")  # the head it got; why no more
    await served_normally(client, proxy, 1)


@pytest.mark.parametrize("path", BIG_PATHS)
async def test_an_answer_larger_than_response_buffer_keeps_its_slot_until_the_caller_catches_up(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener,
    path: str,
) -> None:
    paced = serve_big(upstream)
    proxy = await sidecar_factory(limited(upstream, 1, "{response_buffer: 16KiB}"))
    reader = await attackers(proxy.port, get(path, close=True), slow_reader=True)
    await first_bytes_reached(reader, paced)
    async with client.get(proxy.url + "/normal") as response:
        assert response.status == 503
        assert response.headers["x-sidecar-error"] == "overloaded"
    # The reader catches up: it gets the whole answer, byte for byte, and the slot comes back.
    head, body = (await read_to_end(reader)).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (dechunk(body) if b"Transfer-Encoding: chunked" in head else body) == BIG
    await served_normally(client, proxy, 1)


async def test_a_slow_but_steady_reader_gets_the_whole_answer_and_keeps_its_connection(
    sidecar_factory: SidecarFactory, upstream: Upstream, attackers: Opener
) -> None:
    upstream.on("/big", big)
    proxy = await sidecar_factory(limited(upstream, 4, "{send_timeout: 5s}"))
    reader = await attackers(proxy.port, get("/big") + get("/big", close=True), slow_reader=True)
    answers = await read_to_end(reader)  # two answers on one connection, read as they come
    first_head, rest = answers.split(b"\r\n\r\n", 1)
    second_head, second = rest[len(BIG):].split(b"\r\n\r\n", 1)
    assert first_head.startswith(b"HTTP/1.1 200 ") and second_head.startswith(b"HTTP/1.1 200 ")
    assert rest[:len(BIG)] == BIG and second == BIG


async def test_a_slot_freed_before_the_request_ends_is_freed_once(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    upstream.on("/big", big)
    proxy = await sidecar_factory(limited(upstream, 2))
    # Answers that free their slot early (a slow reader's, whole ones, a HEAD); the proxy's own
    # end-of-request step runs after each of them too.
    reader = await attackers(proxy.port, get("/big"), slow_reader=True)
    await wait_until(lambda: has_bytes_waiting(reader))
    await served_normally(client, proxy, 3)
    async with client.head(proxy.url + "/normal") as response:
        assert response.status == 200

    async def held() -> int:
        async with client.get(proxy.url + "/held") as response:
            await response.read()
            return response.status

    both = [asyncio.create_task(held()) for _ in range(2)]
    await gate.until_waiting(2)
    async with client.get(proxy.url + "/normal") as response:  # a slot freed twice would let it in
        assert (response.status, response.headers["x-sidecar-error"]) == (503, "overloaded")
    gate.release.set()
    assert await asyncio.gather(*both) == [200, 200]


async def test_issue_15_two_hundred_slow_bodies_and_two_hundred_slow_readers_leave_the_route_serving(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, attackers: Opener
) -> None:
    """The issue's demonstration: against `max_concurrent: 100`, normal requests still succeed."""
    upstream.on("/big", big)
    proxy = await sidecar_factory(limited(upstream, 100))
    for _ in range(200):
        await attackers(proxy.port, slow_body())
        await attackers(proxy.port, get("/big"), slow_reader=True)
    await wait_until(lambda: len(upstream.hits_for("/big")) == 200, limit=30)
    await wait_until(lambda: in_flight(proxy) == 400, limit=30)
    await until_served(client, proxy)
    await served_normally(client, proxy, 20)
    assert upstream.hits_for("/upload") == []
