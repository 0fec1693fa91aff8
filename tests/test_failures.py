"""Failures: each broken upstream gets the caller a clear answer, and a truncated body never looks whole."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Gate, Hit, SidecarFactory, Upstream, answering, drop_connection, route_yaml, wait_until
from tests.helpers import status_of


def error_body(kind: str, message: str, retryable: bool, attempts: int = 1, route: str = "main") -> dict[str, object]:
    return {"error": kind, "message": message, "route": route, "retryable": retryable, "attempts": attempts}


async def test_refused_connection_is_502_connect_failure(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{unused_tcp_port}"))
    async with client.get(proxy.url + "/") as response:
        assert response.status == 502
        assert response.headers["x-sidecar-error"] == "connect_failure"
        body = await response.json()
    assert body["error"] == "connect_failure" and body["retryable"] is True and body["route"] == "main"
    assert f"127.0.0.1:{unused_tcp_port}" in body["message"]
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="502") == 1


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full, so a new TCP connect gets no answer (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the backlog; further SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


async def test_connect_timeout_is_502_connect_failure(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, blackhole: int
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{blackhole}", """
        timeouts: {connect: 100ms, per_try: 5s}
    """))
    async with client.get(proxy.url + "/") as response:
        assert response.status == 502
        body = await response.json()
    assert body == error_body("connect_failure", f"connect to 127.0.0.1:{blackhole} timed out after 0.1s", True, 2)


async def test_reset_before_headers_is_502_upstream_reset(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/drop", drop_connection)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.post(proxy.url + "/drop", data=b"once") as response:
        assert response.status == 502
        assert response.headers["x-sidecar-error"] == "upstream_reset"
        body = await response.json()
    assert body == error_body(
        "upstream_reset", f"127.0.0.1:{upstream.port} closed the connection before response headers", True
    )
    assert len(upstream.hits) == 1


@pytest.fixture
async def garbage_server() -> AsyncIterator[int]:
    """A TCP server that answers every request with bytes that are not HTTP."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SMTP ready, not HTTP at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_garbage_response_is_502_bad_upstream_response(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, garbage_server: int
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{garbage_server}"))
    async with client.get(proxy.url + "/") as response:
        assert response.status == 502
        assert response.headers["x-sidecar-error"] == "bad_upstream_response"
        body = await response.json()
    assert body["error"] == "bad_upstream_response" and body["retryable"] is False


async def slow_headers(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    await asyncio.sleep(2)
    return web.Response(text="too late")


async def test_per_try_timeout_is_504_timeout(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/slow", slow_headers)
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {per_try: 100ms, total: 10s}"))
    async with client.get(proxy.url + "/slow") as response:
        assert response.status == 504
        assert response.headers["x-sidecar-error"] == "timeout"
        body = await response.json()
    assert body == error_body("timeout", f"127.0.0.1:{upstream.port} sent no response headers within 0.1s", True)


async def test_total_timeout_below_per_try_bounds_the_attempt(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/slow", slow_headers)
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {per_try: 10s, total: 150ms}"))
    async with client.get(proxy.url + "/slow") as response:
        assert response.status == 504
        body = await response.json()
    assert body["error"] == "timeout"
    assert "within 0.15s" in body["message"]


async def test_a_caller_deadline_shorter_than_a_pending_attempt_times_out_first(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """Attempts share one timer while they expire in the order they started; one that would
    expire earlier than an attempt already waiting must not wait for that one's expiry."""
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        timeouts: {per_try: 10s, total: 10s}
        retries: {attempts: 1}
    """))

    async def held(headers: dict[str, str]) -> tuple[int, str | None]:
        async with client.get(proxy.url + "/held", headers=headers) as response:
            await response.read()
            return response.status, response.headers.get("x-sidecar-error")

    patient = [asyncio.create_task(held({})) for _ in range(3)]  # expiries 10 s away, in order
    await gate.until_waiting(3)
    hurried = asyncio.create_task(held({"x-sidecar-timeout-ms": "100"}))
    async with asyncio.timeout(5):  # far below the patient ones' 10 s
        assert await hurried == (504, "timeout")
    assert not any(task.done() for task in patient)
    gate.release.set()
    assert await asyncio.gather(*patient) == [(200, None)] * 3
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="timeout") == 1


async def test_attempts_that_expire_in_order_each_time_out_on_time(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/slow", slow_headers)
    upstream.on("/fast", answering(200, "fast"))
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        timeouts: {per_try: 150ms, total: 10s}
        retries: {attempts: 1}
    """))

    # Slow attempts started 50 ms apart, a fast one between them that ends and leaves the shared
    # timer's queue: when the first expires the others are still pending, and every slow one must
    # still time out (its upstream would answer 200 after 2 s).
    started = [asyncio.create_task(status_of(client, proxy.url + "/slow"))]
    await asyncio.sleep(0.05)
    started += [asyncio.create_task(status_of(client, proxy.url + path)) for path in ("/fast", "/slow")]
    await asyncio.sleep(0.05)
    started.append(asyncio.create_task(status_of(client, proxy.url + "/slow")))
    results = await asyncio.gather(*started)
    assert results == [(504, "timeout"), (200, None), (504, "timeout"), (504, "timeout")]
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="timeout") == 3


async def test_per_try_defaults_to_total(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/slow", slow_headers)
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {total: 120ms}"))
    async with client.get(proxy.url + "/slow") as response:
        assert response.status == 504
        assert "within 0.12s" in (await response.json())["message"]


async def test_reset_mid_body_aborts_the_caller_connection(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def die_mid_body(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def die_mid_chunked(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"y" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.on("/sized", die_mid_body)
    upstream.on("/chunked", die_mid_chunked)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    for path in ("/sized", "/chunked"):
        async with client.get(proxy.url + path) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_stream_silent_longer_than_idle_is_cut(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def stall(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(3)
        await response.write(b"data: never\n\n")
        return response

    upstream.on("/stall", stall)
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {idle: 200ms}"))
    async with client.get(proxy.url + "/stall") as response:
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_stream_with_traffic_outlives_total_and_idle(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def ticking(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(8):
            await response.write(f"data: {number}\n\n".encode())
            await asyncio.sleep(0.05)
        return response

    upstream.on("/ticks", ticking)
    # The stream lasts ~400ms: longer than total (until headers) and than idle (between chunks).
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {total: 150ms, idle: 150ms}"))
    async with client.get(proxy.url + "/ticks") as response:
        body = await response.read()
    assert body == b"".join(f"data: {number}\n\n".encode() for number in range(8))


# A body over retries.max_body streams (silence: timeouts.idle); a smaller one is read whole
# before the request goes anywhere (silence: server.body_timeout).
@pytest.mark.parametrize("retries", ["attempts: 1, max_body: 50", "attempts: 2"], ids=["streamed", "buffered"])
async def test_caller_silent_mid_upload_gets_408_and_upstream_never_sees_a_complete_body(
    sidecar_factory: SidecarFactory, upstream: Upstream, retries: str
) -> None:
    upload_failed = asyncio.Event()
    streamed = "max_body" in retries

    async def reader(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        try:
            hit.body = await request.content.read()
        except Exception:
            upload_failed.set()
            raise
        return web.Response(text="complete?")

    upstream.on("/upload", reader)
    proxy = await sidecar_factory("server: {body_timeout: 150ms}\n" + route_yaml(
        upstream.url, f"timeouts: {{idle: 150ms}}\nretries: {{{retries}}}"))
    reader_stream, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"z" * 10)
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader_stream.readuntil(b"\r\n\r\n")
        if streamed:  # the upstream saw the body start, then break off
            await upload_failed.wait()
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"x-sidecar-error: request_timeout" in head
    assert b"Connection: close" in head
    if streamed:
        assert len(upstream.hits) == 1 and upstream.hits[0].body == b""
    else:  # a small body is read whole before the first attempt: nothing was sent
        assert upstream.hits == []


async def test_dropped_pooled_connection_is_not_silently_resent(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """aiohttp's client would resend a GET once on a dead pooled connection; attempts are ours to count."""

    upstream.on("/drop", drop_connection)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 1}"))
    async with client.get(proxy.url + "/warm") as response:  # leaves a pooled connection
        assert response.status == 200
    async with client.get(proxy.url + "/drop") as response:
        assert response.status == 502
    assert [hit.target for hit in upstream.hits] == ["/warm", "/drop"]
    assert upstream.hits[0].peer == upstream.hits[1].peer


async def test_caller_leaving_before_headers_is_caller_gone_not_a_timeout(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    gate = Gate()
    upstream.on("/slow", gate)
    proxy = await sidecar_factory(route_yaml(upstream.url, "timeouts: {per_try: 5s}\nretries: {attempts: 1}"))
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    await gate.until_waiting(1)
    writer.close()  # the caller hangs up while the attempt waits for headers
    await wait_until(lambda: proxy.metric("sidecar_in_flight_requests", route="main") == 0)
    (entry,) = proxy.access_log()
    assert (entry["status"], entry["error"]) == (499, "caller_gone")
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="timeout") == 0
    gate.release.set()
