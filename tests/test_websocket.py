"""WebSocket pass-through: the `websockets` package as the caller and as the upstream, the sidecar between."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from sidecar.wire.websocket import _Frames
from tests.conftest import (
    Gate,
    RawBehaviour,
    RunningSidecar,
    SidecarFactory,
    Upstream,
    answering,
    route_yaml,
    wait_until,
    with_test_listeners,
)

QUIET = {"compression": None, "ping_interval": None, "max_size": None}  # byte counts stay exact
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2


@dataclass
class WsUpstream:
    """A websockets server: echoes, except on a few paths that misbehave on purpose."""

    url: str = ""
    handshakes: list[Headers] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)  # as each connection's handler saw it end
    flood: int = 256  # messages of 64 KiB that /flood sends


async def _handle(upstream: WsUpstream, ws: ServerConnection) -> None:
    path = ws.request.path if ws.request else "/"
    try:
        if path == "/close":
            await ws.close(4000, "bye")
        elif path == "/kill":
            await ws.recv()
            assert ws.transport is not None
            ws.transport.abort()  # the upstream dies mid-connection
        elif path == "/flood":
            for _ in range(upstream.flood):
                await ws.send(b"x" * 65536)
            await ws.wait_closed()
        elif path == "/hold":
            await ws.wait_closed()
        else:
            async for message in ws:
                await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        await ws.wait_closed()
        upstream.close_codes.append(ws.close_code)


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    upstream = WsUpstream()

    def record(connection: ServerConnection, request: Request) -> Response | None:
        upstream.handshakes.append(request.headers)
        return None

    async def handler(ws: ServerConnection) -> None:
        await _handle(upstream, ws)

    # A deep accept queue: 200 connects at once must not wait for SYN retries (the test is not about them).
    server: Server = await serve(
        handler, "127.0.0.1", 0, process_request=record, backlog=1024, **QUIET  # type: ignore[arg-type]
    )
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"http://127.0.0.1:{port}"
    yield upstream
    server.close()
    await server.wait_closed()


def ws_url(sidecar: RunningSidecar, path: str = "/") -> str:
    return sidecar.url.replace("http://", "ws://") + path


def open_ws(sidecar: RunningSidecar, path: str = "/", **options: object) -> connect:
    return connect(ws_url(sidecar, path), **{**QUIET, "open_timeout": 5, "close_timeout": 2, **options})  # type: ignore[arg-type]


def gauge(sidecar: RunningSidecar) -> float:
    return sidecar.metric("sidecar_websocket_connections", route="main")


async def test_echo_through_the_sidecar(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    async with open_ws(sidecar, "/chat?room=1") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        assert ws.response is not None
        assert ws.response.headers["x-sidecar-attempts"] == "1"
        assert ws.response.headers["X-Request-Id"]
    [handshake] = ws_upstream.handshakes
    assert handshake["Upgrade"].lower() == "websocket" and "upgrade" in handshake["Connection"].lower()
    assert handshake["X-Forwarded-For"] == "127.0.0.1"
    assert handshake["Sec-WebSocket-Key"]
    assert sidecar.metric("sidecar_requests_total", route="main", method="GET", code="101") == 1


async def test_large_messages_both_ways(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB, every byte value
    async with open_ws(sidecar) as ws:
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send(big[::-1])
        assert await ws.recv() == big[::-1]


async def test_ping_pong(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    async with open_ws(sidecar) as ws:
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(5):
            await pong


async def test_server_initiated_close_reaches_the_caller_with_its_code(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    async with open_ws(sidecar, "/close") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    await wait_until(lambda: gauge(sidecar) == 0)


async def test_upstream_killed_mid_connection_closes_the_caller_at_once(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))  # idle is 5 minutes
    async with open_ws(sidecar, "/kill") as ws:
        await ws.send("last words")
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert closed.value.rcvd is None  # no close frame: the connection just ended (1006 for the caller)
    await wait_until(lambda: gauge(sidecar) == 0)
    assert not sidecar.sidecar._listeners[sidecar.sidecar.config.listen].listener.tunnels.open


async def test_two_hundred_concurrent_connections_echo(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url, "limits: {max_concurrent: 300}"))
    connections = 200
    all_open = asyncio.Event()
    opened = 0

    async def chat(number: int) -> list[str]:
        nonlocal opened
        async with open_ws(sidecar, open_timeout=20) as ws:
            opened += 1
            if opened == connections:
                all_open.set()
            async with asyncio.timeout(20):
                await all_open.wait()  # every connection open at the same time
            answers = []
            for turn in range(3):
                await ws.send(f"{number}-{turn}")
                answers.append(str(await ws.recv()))
            return answers

    results = await asyncio.gather(*(chat(n) for n in range(connections)))
    assert results == [[f"{n}-{turn}" for turn in range(3)] for n in range(connections)]
    await wait_until(lambda: gauge(sidecar) == 0, limit=10)


async def test_the_gauge_counts_open_connections(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    assert gauge(sidecar) == 0
    async with open_ws(sidecar) as first, open_ws(sidecar):
        await wait_until(lambda: gauge(sidecar) == 2)
        await first.close()
        await wait_until(lambda: gauge(sidecar) == 1)
    await wait_until(lambda: gauge(sidecar) == 0)
    # A tunnel is in flight for its whole life, and counted as answered (101) only when it ends.
    assert sidecar.metric("sidecar_in_flight_requests", route="main") == 0


async def test_access_log_line_when_the_connection_ends_with_bytes_both_ways(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    async with open_ws(sidecar, "/socket") as ws:
        await ws.send("hello")  # a client frame: 2 header bytes, 4 of mask, 5 of payload
        assert await ws.recv() == "hello"  # a server frame: 2 + 5
        assert sidecar.access_log() == []  # not while it is open
    # Close frames with code 1000: the caller's 2 + 4 + 2, the upstream's reply 2 + 2.
    await wait_until(lambda: len(sidecar.access_log()) == 1)
    [line] = sidecar.access_log()
    assert line["status"] == 101 and line["route"] == "main" and line["path"] == "/socket"
    assert (line["bytes_in"], line["bytes_out"]) == (11 + 8, 7 + 4)
    assert line["error"] is None and line["attempts"] == 1
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0


async def test_idle_timeout_closes_both_sides(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url, "timeouts: {idle: 300ms}"))
    async with open_ws(sidecar, "/hold") as ws:
        await ws.send("one message, then silence")
        async with asyncio.timeout(5):
            await ws.wait_closed()
    assert ws.close_code == 1006  # cut, no close frame
    await wait_until(lambda: len(ws_upstream.close_codes) == 1)  # the upstream's side ended too
    await wait_until(lambda: gauge(sidecar) == 0)


async def test_traffic_keeps_an_idle_timeout_away(ws_upstream: WsUpstream, sidecar_factory: SidecarFactory) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url, "timeouts: {idle: 300ms}"))
    loop = asyncio.get_running_loop()
    async with open_ws(sidecar) as ws:
        started = loop.time()
        for turn in range(100):  # bounded; goes on for about three idle periods
            await ws.send(str(turn))
            assert await ws.recv() == str(turn)
            if loop.time() - started > 0.9:
                break
            await asyncio.sleep(0.05)  # traffic pacing, not synchronisation
        assert loop.time() - started > 0.9


async def test_drain_closes_open_websockets_with_going_away(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(
        route_yaml(ws_upstream.url) + "shutdown: {drain_delay: 10ms, timeout: 200ms}\n"
    )
    async with open_ws(sidecar) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        async with asyncio.timeout(10):
            await sidecar.sidecar.drain_and_stop()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await wait_until(lambda: ws_upstream.close_codes == [1001])  # the upstream was told too
    assert gauge(sidecar) == 0


async def test_a_listener_dropped_by_a_reload_closes_its_websockets_with_going_away(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    routes = f"""
shutdown: {{drain_delay: 10ms, timeout: 200ms}}
upstreams:
  up: {{endpoints: ["{ws_upstream.url}"]}}
routes:
  - {{name: main, match: {{path_prefix: /}}, upstream: up}}
"""
    config_file = tmp_path / "sidecar.yaml"
    sidecar = await sidecar_factory(
        routes + "  - {name: own, listen: 127.0.0.2:0, upstream: up}\n", config_file=config_file
    )
    own = next(address for address in sidecar.sidecar.bound if address != sidecar.sidecar.config.listen)
    host, port = sidecar.sidecar.bound[own]
    async with connect(f"ws://{host}:{port}/", **QUIET, open_timeout=5) as ws:  # type: ignore[arg-type]
        await ws.send("before")
        assert await ws.recv() == "before"
        config_file.write_text(with_test_listeners(routes))
        await sidecar.sidecar.reload_from_file()
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_an_upstream_that_closes_right_after_its_101_is_relayed_whole(
    raw_upstream: Callable[[RawBehaviour], Awaitable[int]], sidecar_factory: SidecarFactory
) -> None:
    async def accept_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        writer.write(
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            + b"\x81\x03bye" + b"\x88\x02\x03\xe8"  # a text frame and a close frame (1000), same segment
        )
        await writer.drain()

    port = await raw_upstream(accept_then_close)
    sidecar = await sidecar_factory(route_yaml(f"http://127.0.0.1:{port}"))
    async with open_ws(sidecar) as ws:
        assert await ws.recv() == "bye"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    await wait_until(lambda: len(sidecar.access_log()) == 1)
    assert sidecar.access_log()[0]["bytes_out"] == 5 + 4


async def test_route_with_websocket_false_forwards_plain_http(
    upstream: Upstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(route_yaml(upstream.url, "websocket: false"))
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version": "13"}
    async with client.get(sidecar.url + "/ws", headers=headers) as response:
        assert response.status == 200 and await response.text() == "GET /ws"
    [hit] = upstream.hits
    assert "Upgrade" not in hit.headers and "upgrade" not in hit.headers.get("Connection", "").lower()
    with pytest.raises(InvalidStatus) as refused:  # a WebSocket client sees the upstream's plain answer
        async with open_ws(sidecar, "/ws"):
            pass
    assert refused.value.response.status_code == 200


async def test_a_caller_that_hangs_up_ends_the_tunnel_as_answered(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    open_ = sidecar.sidecar._listeners[sidecar.sidecar.config.listen]
    server = open_.runner.server
    assert server is not None
    async with open_ws(sidecar) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        assert ws.transport is not None
        ws.transport.abort()  # no close frame: the TCP connection just ends
    await wait_until(lambda: ws_upstream.close_codes == [1006])  # the upstream's side was closed too
    await wait_until(lambda: gauge(sidecar) == 0 and not server.connections)
    # The normal end of a tunnel, not a caller gone mid-request (499).
    assert sidecar.metric("sidecar_requests_total", route="main", method="GET", code="101") == 1
    assert sidecar.metric("sidecar_requests_total", route="main", method="GET", code="499") == 0


@pytest.mark.parametrize("protocol", ["h2c", "websocket, h2c", "tls/1.0"])
async def test_other_upgrades_are_ignored_and_the_request_goes_on_as_http11(
    protocol: str, upstream: Upstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(route_yaml(upstream.url))
    headers = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": protocol,
               "HTTP2-Settings": "AAMAAABkAAQAoAAAAAIAAAAA"}
    async with client.get(sidecar.url + "/x", headers=headers) as response:
        assert response.status == 200  # what a client offering h2c on http:// (Java, curl --http2) needs
        assert "x-sidecar-error" not in response.headers
        assert await response.text() == "GET /x"
    seen = upstream.hits[0].headers
    assert "Upgrade" not in seen and "HTTP2-Settings" not in seen and "Connection" not in seen
    # Upgrade without Connection naming it is a stray hop-by-hop header: dropped, the request goes on.
    async with client.get(sidecar.url + "/y", headers={"Upgrade": protocol}) as response:
        assert response.status == 200
    assert [hit.target for hit in upstream.hits] == ["/x", "/y"] and "Upgrade" not in upstream.hits[1].headers


async def test_a_declined_handshake_is_relayed_and_never_retried(
    upstream: Upstream, sidecar_factory: SidecarFactory
) -> None:
    upstream.on("/ws", answering(503, "not now"))
    sidecar = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, on: [503, reset, timeout]}"))
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(sidecar, "/ws"):
            pass
    assert refused.value.response.status_code == 503 and refused.value.response.body == b"not now"
    assert len(upstream.hits) == 1
    assert sidecar.metric("sidecar_retries_skipped_total", route="main", reason="upgrade") == 1


async def test_the_wait_for_101_is_bounded_by_per_try(upstream: Upstream, sidecar_factory: SidecarFactory) -> None:
    gate = Gate()  # never answers within the test
    upstream.on("/ws", gate)
    sidecar = await sidecar_factory(route_yaml(
        upstream.url, "timeouts: {per_try: 200ms, total: 5s}\nretries: {attempts: 3, on: [timeout]}"
    ))
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(sidecar, "/ws"):
            pass
    gate.release.set()
    response = refused.value.response
    assert response.status_code == 504 and response.headers["x-sidecar-error"] == "timeout"
    assert response.headers["x-sidecar-attempts"] == "1"  # a timeout is not retried for a handshake
    assert len(upstream.hits) == 1


async def test_a_connection_holds_its_concurrency_slot_until_it_ends(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url, "limits: {max_concurrent: 1}"))
    async with open_ws(sidecar) as ws:
        with pytest.raises(InvalidStatus) as refused:
            async with open_ws(sidecar):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["x-sidecar-error"] == "overloaded"
        await ws.send("still here")
        assert await ws.recv() == "still here"
    await wait_until(lambda: gauge(sidecar) == 0)
    async with open_ws(sidecar) as again:  # the slot is free again
        await again.send("x")
        assert await again.recv() == "x"


async def test_a_caller_that_stops_reading_stops_the_upstream(
    ws_upstream: WsUpstream, sidecar_factory: SidecarFactory
) -> None:
    ws_upstream.flood = 256  # 16 MiB offered
    sidecar = await sidecar_factory(route_yaml(ws_upstream.url))
    listener = sidecar.sidecar._listeners[sidecar.sidecar.config.listen].listener
    # The client stops reading its socket after a few queued messages (max_queue).
    async with open_ws(sidecar, "/flood", max_queue=2) as ws:
        await wait_until(lambda: len(listener.tunnels.open) == 1)
        [tunnel] = listener.tunnels.open
        caller, upstream_side = tunnel._caller, tunnel._upstream_side
        assert caller is not None and upstream_side is not None
        # Backpressure: the sidecar stops reading the upstream instead of queueing for the caller.
        await wait_until(lambda: not upstream_side.transport.is_reading(), limit=10)
        assert caller.transport.get_write_buffer_size() < 1024 * 1024
        assert tunnel.bytes_out < 8 * 1024 * 1024
        received = 0
        for _ in range(256):
            received += len(await ws.recv())
        assert received == 256 * 65536


def frames_of(*chunks: bytes) -> _Frames:
    frames = _Frames()
    for chunk in chunks:
        frames.feed(chunk)
    return frames


def test_frame_boundaries_are_tracked_across_chunks() -> None:
    small = b"\x81\x05hello"
    masked = b"\x82\x85" + b"abcd" + b"12345"
    medium = b"\x82\x7e\x01\x00" + b"m" * 256
    large = b"\x82\x7f" + (70000).to_bytes(8, "big") + b"L" * 70000
    stream = small + masked + medium + large + small
    assert frames_of(stream).at_boundary
    for cut in (1, 2, 3, 7, 12, 13, 20, 30, 300, 5000, len(stream) - 1):
        assert not frames_of(stream[:cut]).at_boundary or cut in (7, 18)
        assert frames_of(stream[:cut], stream[cut:]).at_boundary
    assert frames_of(stream[:7]).at_boundary and frames_of(stream[:18]).at_boundary
    assert not frames_of(stream).closed and frames_of(stream, b"\x88\x02\x03\xe8").closed
