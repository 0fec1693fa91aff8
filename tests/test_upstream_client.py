"""The upstream client's own promises: interim responses, connection reuse and its limits, request framing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict

from sidecar.config.model import Endpoint
from sidecar.errors import BadRequest
from sidecar.wire.body import CallerBody
from sidecar.wire.upstream_client import UpstreamClient
from tests.conftest import Hit, RawBehaviour, SidecarFactory, Upstream, raw_exchange, route_yaml, wait_until


def endpoint_at(port: int, keepalive: float = 5.0) -> Endpoint:
    return Endpoint(base=f"http://127.0.0.1:{port}", authority=f"127.0.0.1:{port}", host="127.0.0.1", port=port,
                    tls=False, path="", keepalive=keepalive)


def endpoint_of(upstream: Upstream, keepalive: float = 5.0) -> Endpoint:
    return endpoint_at(upstream.port, keepalive)


async def get_from(client: UpstreamClient, endpoint: Endpoint) -> bytes:
    response = await client.send(endpoint, "GET", "/", CIMultiDict(Host=endpoint.authority), None, 1.0)
    body = await response.content.read()
    response.release()
    return body


async def get(client: UpstreamClient, upstream: Upstream) -> bytes:
    return await get_from(client, endpoint_of(upstream))


async def continue_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def test_interim_100_continue_is_skipped_and_the_final_response_delivered(
    sidecar_factory: SidecarFactory, raw_upstream: Callable[[RawBehaviour], Awaitable[int]],
    client: aiohttp.ClientSession,
) -> None:
    port = await raw_upstream(continue_then_ok)
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{port}"))
    async with client.get(proxy.url + "/") as response:
        assert response.status == 200
        assert await response.read() == b"ok"


async def test_upstream_that_closes_after_answering_gets_a_new_connection_next_time(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def answer_and_close(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.Response(text="once")
        response.force_close()  # says Connection: close
        return response

    upstream.on("/once", answer_and_close)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    for path in ("/once", "/once", "/other"):
        async with client.get(proxy.url + path) as response:
            assert response.status == 200
    assert len({hit.peer for hit in upstream.hits}) == 3


async def test_early_answer_during_an_upload_reaches_the_caller_and_the_connection_is_dropped(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def refuse_unread(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.Response(status=413, text="too big for me")
        response.force_close()
        return response

    upstream.on("/upload", refuse_unread)
    proxy = await sidecar_factory(route_yaml(upstream.url))

    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        await wait_until(lambda: len(upstream.hits) == 1)
        yield b"second part"  # the upstream has answered by now, without reading

    async with client.post(proxy.url + "/upload", data=body()) as response:
        assert response.status == 413
        assert await response.read() == b"too big for me"
    async with client.get(proxy.url + "/after") as response:
        assert response.status == 200
    assert upstream.hits[0].peer != upstream.hits[1].peer


async def test_head_and_get_alternate_on_one_pooled_connection_with_the_right_bodies(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    for method in ("HEAD", "GET", "GET", "HEAD", "HEAD", "GET"):
        async with client.request(method, proxy.url + "/x") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(f"{method} /x"))  # HEAD declares it too
            assert await response.read() == (b"" if method == "HEAD" else b"GET /x")
    assert len({hit.peer for hit in upstream.hits}) == 1


async def test_post_without_a_body_is_sent_with_content_length_zero(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, b"POST /empty HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.hits[0].headers["Content-Length"] == "0"
    assert "Transfer-Encoding" not in upstream.hits[0].headers


async def test_idle_pooled_connections_are_reused_then_dropped_after_keepalive(upstream: Upstream) -> None:
    client = UpstreamClient(max_line=8190, max_field=8190)
    endpoint = endpoint_of(upstream, keepalive=0.2)
    try:
        await get_from(client, endpoint)
        await get_from(client, endpoint)
        await asyncio.sleep(0.3)  # past keepalive: that connection may be closing upstream
        await get_from(client, endpoint)
    finally:
        client.close()
    first, second, third = (hit.peer for hit in upstream.hits)
    assert first == second
    assert third != second


async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(upstream: Upstream) -> None:
    client = UpstreamClient(max_line=8190, max_field=8190)
    endpoint = endpoint_of(upstream)
    headers = CIMultiDict({"Host": endpoint.authority, "X-Split": "a\r\nGET /smuggled HTTP/1.1"})
    try:
        with pytest.raises(BadRequest):
            await client.send(endpoint, "GET", "/", headers, None, 1.0)
        assert await get(client, upstream) == b"GET /"
    finally:
        client.close()
    assert [hit.target for hit in upstream.hits] == ["/"]


async def test_idle_connections_are_closed_after_keepalive_without_new_requests(
    raw_upstream: Callable[[RawBehaviour], Awaitable[int]],
) -> None:
    closed = asyncio.Event()

    async def answer_then_watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        assert await reader.read() == b""  # until the client closes its end
        closed.set()

    port = await raw_upstream(answer_then_watch)
    client = UpstreamClient(max_line=8190, max_field=8190)
    endpoint = endpoint_at(port, keepalive=0.1)
    try:
        response = await client.send(endpoint, "GET", "/", CIMultiDict(Host=endpoint.authority), None, 1.0)
        assert await response.content.read() == b"ok"
        response.release()
        assert not closed.is_set()  # pooled, open
        async with asyncio.timeout(2):
            await closed.wait()  # closed by the sweep, with no request coming to notice it
    finally:
        client.close()


async def test_a_connection_whose_request_body_failed_is_not_reused(
    raw_upstream: Callable[[RawBehaviour], Awaitable[int]],
) -> None:
    connections = 0

    async def answer_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:  # one answer per request head, whatever the body does
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    port = await raw_upstream(answer_early)
    client = UpstreamClient(max_line=8190, max_field=8190)
    endpoint = endpoint_at(port)
    loop = asyncio.get_running_loop()
    stalled = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stalled.feed_data(b"part of a body that never finishes")
    headers = CIMultiDict({"Host": endpoint.authority, "Content-Length": "1000"})
    try:
        response = await client.send(endpoint, "POST", "/", headers, CallerBody(stalled, idle=0.05), 1.0)
        assert await response.content.read() == b"ok"
        await asyncio.sleep(0.1)  # the caller's body goes silent past its idle timeout
        response.release()
        assert await get_from(client, endpoint) == b"ok"
    finally:
        client.close()
    assert connections == 2  # the half-sent body's connection was dropped, not reused
