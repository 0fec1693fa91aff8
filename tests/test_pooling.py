"""What may go back to the upstream connection pool: a response never reaches the wrong caller.

Each upstream here is a raw socket server, so it can misbehave the way real servers do: a
trailer, a late second response, a 408 before an idle close, bytes past a response's end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

from tests.conftest import RawBehaviour, SidecarFactory, raw_exchange, route_yaml, wait_until

RawUpstream = Callable[[RawBehaviour], Awaitable[int]]


def answer(text: str, extra: str = "") -> bytes:
    body = text.encode()
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class Scripted:
    """A raw upstream: for each request head, `script(path, writer)` writes what it likes.
    Counts connections, so a test can show its requests shared one."""

    def __init__(self, script: Callable[[str, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.script = script
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        for _ in range(1000):
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            await self.script(path, writer)
            await writer.drain()


async def get_text(client: aiohttp.ClientSession, url: str) -> tuple[int, str, dict[str, str]]:
    async with client.get(url) as response:
        return response.status, await response.text(), dict(response.headers)


async def test_a_trailer_never_becomes_a_header_of_the_next_response_on_that_connection(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream
) -> None:
    async def script(path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/trailers":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                         b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n")
        else:
            writer.write(answer(f"plain {path}"))

    upstream = Scripted(script)
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(upstream)}"))
    for round_ in range(6):  # alternate callers: a fresh client session each
        async with aiohttp.ClientSession() as caller:
            status, body, headers = await get_text(caller, proxy.url + "/trailers")
            assert (status, body) == (200, "hello")
        async with aiohttp.ClientSession() as other:
            status, body, headers = await get_text(other, proxy.url + f"/plain{round_}")
            assert (status, body) == (200, f"plain /plain{round_}")
            assert "X-Checksum" not in headers
    assert upstream.connections == 1  # the pooled connection was reused throughout: the leak's path


async def test_a_late_second_response_closes_the_connection_and_reaches_nobody(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream, client: aiohttp.ClientSession
) -> None:
    async def script(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(f"rid={path}"))
        if path == "/late":
            await writer.drain()
            await asyncio.sleep(0.1)  # the upstream's misbehaviour: a second answer, unasked
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nrid=STALE-LATER")

    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(Scripted(script))}"))
    assert (await get_text(client, proxy.url + "/late"))[:2] == (200, "rid=/late")
    await wait_until(lambda: proxy.metric("sidecar_upstream_unsolicited_closes_total",
                                          endpoint=f"http://127.0.0.1:{proxy_port(proxy)}") == 1)
    for n in range(3):
        assert (await get_text(client, proxy.url + f"/next{n}"))[:2] == (200, f"rid=/next{n}")


def proxy_port(proxy: object) -> int:
    """The port of the only endpoint of the running sidecar's only upstream."""
    sidecar = proxy.sidecar  # type: ignore[attr-defined]
    return int(sidecar.config.upstreams[0].endpoints[0].port)


async def test_a_408_sent_on_an_idle_connection_is_never_read_as_the_next_answer(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream, client: aiohttp.ClientSession
) -> None:
    async def script(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(f"rid={path}"))
        if path == "/first":
            await writer.drain()
            await asyncio.sleep(0.05)
            # What several servers send before closing an idle keep-alive connection.
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1.0)  # and the close comes later: a window for the next request

    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(Scripted(script))}"))
    assert (await get_text(client, proxy.url + "/first"))[:2] == (200, "rid=/first")
    await wait_until(lambda: proxy.metric("sidecar_upstream_unsolicited_closes_total",
                                          endpoint=f"http://127.0.0.1:{proxy_port(proxy)}") == 1)
    status, body, headers = await get_text(client, proxy.url + "/second")
    assert (status, body, headers["x-sidecar-attempts"]) == (200, "rid=/second", "1")


async def test_bytes_past_the_end_of_a_response_keep_its_connection_out_of_the_pool(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream, client: aiohttp.ClientSession
) -> None:
    async def script(path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/whole-extra":  # a complete extra message in the same write
            writer.write(answer("rid=/whole-extra") + b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nrid=STALE-EXTRA")
        elif path == "/partial-extra":  # the start of another message in the same write
            writer.write(answer("rid=/partial-extra") + b"HTTP/1.1 200 OK\r\nContent-Le")
        else:
            writer.write(answer(f"rid={path}"))

    upstream = Scripted(script)
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(upstream)}"))
    for shape in ("/whole-extra", "/partial-extra"):
        assert (await get_text(client, proxy.url + shape))[:2] == (200, f"rid={shape}")
        for n in range(3):
            status, body, headers = await get_text(client, proxy.url + f"{shape}/next{n}")
            assert (status, body, headers["x-sidecar-attempts"]) == (200, f"rid={shape}/next{n}", "1")
    # The first connection, then a fresh one for every request: bytes past a response's end make
    # the endpoint distrusted, so no connection to it is reused for a while.
    assert upstream.connections == 8


async def test_a_reused_connection_the_upstream_closes_is_counted_and_a_get_is_retried(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream, client: aiohttp.ClientSession
) -> None:
    async def close_on_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer("first"))
        await writer.drain()
        # The idle-timeout race: the next request arrives just as the server gives up on the connection.
        await reader.readuntil(b"\r\n\r\n")

    port = await raw_upstream(close_on_second_request)
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{port}"))
    assert (await get_text(client, proxy.url + "/a"))[:2] == (200, "first")
    status, body, headers = await get_text(client, proxy.url + "/b")
    assert (status, body, headers["x-sidecar-attempts"]) == (200, "first", "2")
    assert proxy.metric("sidecar_upstream_stale_connections_total", endpoint=f"http://127.0.0.1:{port}") == 1


async def test_an_upstream_keep_alive_timeout_shortens_how_long_its_connection_is_kept(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream
) -> None:
    closed = asyncio.Event()

    async def keep_alive_one_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer("ok", "Keep-Alive: timeout=1\r\n"))
        await writer.drain()
        assert await reader.read() == b""  # until the sidecar closes its end
        closed.set()

    port = await raw_upstream(keep_alive_one_second)
    # Left to keepalive_timeout alone, the connection would stay pooled for a minute.
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{port}").replace(
        "endpoints:", "keepalive_timeout: 60s, endpoints:"))
    answer_bytes = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer_bytes.endswith(b"ok")
    async with asyncio.timeout(5):
        await closed.wait()


async def test_expect_100_continue_is_answered_by_the_sidecar_and_not_forwarded(
    sidecar_factory: SidecarFactory, upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    for size in (10, 70_000):  # buffered for retries, and streamed
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(f"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {size}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            async with asyncio.timeout(5):  # a caller waiting to be asked: it sends nothing until the 100
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            await writer.drain()
            async with asyncio.timeout(5):
                final = await reader.read(-1)
        finally:
            writer.close()
        assert final.startswith(b"HTTP/1.1 200 ")
        hit = upstream.hits[-1]
        assert hit.body == body
        assert "Expect" not in hit.headers
    # aiohttp's own client waits for the 100 before sending: it must not hang.
    async with asyncio.timeout(5), client.post(proxy.url + "/aio", data=b"y" * 5000, expect100=True) as response:
        assert response.status == 200
    assert upstream.hits[-1].body == b"y" * 5000


async def test_an_early_answer_to_a_large_upload_reaches_the_caller_not_a_502(
    sidecar_factory: SidecarFactory, raw_upstream: RawUpstream, client: aiohttp.ClientSession
) -> None:
    async def refuse_unread(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is never read
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied")
        await writer.drain()

    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{await raw_upstream(refuse_unread)}"))
    upload = b"z" * (20 * 1024 * 1024)
    for _ in range(5):
        async with client.post(proxy.url + "/upload", data=upload) as response:
            assert response.status == 401
            assert await response.read() == b"denied"
            assert "x-sidecar-error" not in response.headers
