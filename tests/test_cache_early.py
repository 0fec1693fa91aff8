"""Fresh hits answered as soon as their request is parsed (proxy/early.py, wire/server_protocol.py).

The early path is an optimisation with a promise: the caller gets what the usual path would
have given, byte for byte, counted and logged the same, and anything that is not the plainest
fresh hit takes the usual path, in order. Each test counts the early answers by wrapping the
listener's `early_answer` (the callable the wire offers requests to), so a test of the early
path fails if the request quietly took the usual one, and the other way round.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from sidecar.wire.answer import prepare_head
from sidecar.wire.server_protocol import GuardedServer
from sidecar.wire.whole_response import early_answer
from tests.conftest import RawBehaviour, RunningSidecar, SidecarFactory, Upstream, wait_until
from tests.test_cache_layer import Clock, answer, cached_yaml

pytestmark = pytest.mark.both_loops  # the early path writes to transports itself

BODY = b"a stored answer, " * 40
FRESH = {"Cache_Control": "max-age=60", "ETag": '"v1"', "X_Custom": "kept"}


def guarded_server(proxy: RunningSidecar) -> GuardedServer:
    (listener,) = proxy.sidecar._listeners.values()
    server = listener.runner.server
    assert isinstance(server, GuardedServer)
    return server


def count_early(proxy: RunningSidecar) -> list[str]:
    """The paths answered early from now on, in order."""
    server = guarded_server(proxy)
    offered = server.early_answer
    assert offered is not None, "a listener with a cached route offers requests early"
    answered: list[str] = []

    def counting(method: str, raw_path: str, headers: CIMultiDictProxy[str]) -> bytes | None:
        result = offered(method, raw_path, headers)
        if result is not None:
            answered.append(raw_path)
        return result

    server.early_answer = counting
    return answered


class Connection:
    """One raw keep-alive connection to the sidecar: requests out, whole responses in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))  # one write: pipelined when there are several

    async def response(self) -> tuple[list[bytes], bytes]:
        """(head lines without the blank one, body) of the next response (Content-Length framed)."""
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            lengths = [line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"content-length:")]
            body = await self.reader.readexactly(int(lengths[0])) if lengths else b""
        return lines, body

    async def closed(self) -> bool:
        async with asyncio.timeout(5):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, *fields: str) -> bytes:
    return "".join([f"GET {path} HTTP/1.1\r\nHost: svc\r\n", *(f"{field}\r\n" for field in fields), "\r\n"]).encode()


def field(lines: list[bytes], name: str) -> str | None:
    prefix = name.lower().encode() + b":"
    values = [line.split(b":", 1)[1].strip().decode() for line in lines if line.lower().startswith(prefix)]
    return values[0] if values else None


@pytest.fixture
async def proxy(sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock) -> RunningSidecar:
    upstream.on("/item", answer(BODY, **FRESH))
    return await sidecar_factory(cached_yaml(upstream.url), wall_clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_a_fresh_hit_is_answered_early_with_the_bytes_the_usual_path_sends(
    proxy: RunningSidecar, upstream: Upstream
) -> None:
    early = count_early(proxy)
    connection = await Connection.open(proxy.port)
    connection.send(get("/item", "X-Request-Id: req-1"))
    miss_head, miss_body = await connection.response()
    connection.send(get("/item", "X-Request-Id: req-1"))
    early_head, early_body = await connection.response()
    # x-sidecar-max-attempts sends a request the usual way (admission reads it); a hit all the same.
    connection.send(get("/item", "X-Request-Id: req-1", "x-sidecar-max-attempts: 3"))
    usual_head, usual_body = await connection.response()
    connection.close()

    assert field(miss_head, "x-sidecar-cache") == "MISS"
    assert early == ["/item"]
    assert len(upstream.hits_for("/item")) == 1
    assert early_body == usual_body == miss_body == BODY

    def without_date(lines: list[bytes]) -> list[bytes]:
        return [line for line in lines if not line.lower().startswith(b"date:")]

    assert without_date(early_head) == without_date(usual_head)  # same fields, same order, same values
    assert early_head[0] == b"HTTP/1.1 200 OK"
    assert (field(early_head, "x-sidecar-cache"), field(early_head, "Age"), field(early_head, "X-Request-Id"),
            field(early_head, "X-Custom"), field(early_head, "x-sidecar-attempts")) == ("HIT", "0", "req-1", "kept",
                                                                                       "0")
    assert field(early_head, "Date") is not None and field(early_head, "Server") is not None


async def test_the_lines_the_sidecar_adds_are_the_same_on_both_paths(
    sidecar_factory: SidecarFactory, raw_upstream: Callable[[RawBehaviour], Awaitable[int]], clock: Clock
) -> None:
    """An upstream that sends no Date and no Server (the sidecar adds both), a header value
    that is not UTF-8 (it must leave as it came) and an Age of its own (replaced)."""
    served = []
    head = (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nAge: 3\r\nX-Name: caf\xe9\r\n"
            b"Content-Length: 5\r\n\r\nhello")

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):  # bounded by the test's requests
            served.append(1)
            writer.write(head)

    port = await raw_upstream(respond)
    proxy = await sidecar_factory(cached_yaml(f"http://127.0.0.1:{port}"), wall_clock=clock)
    early = count_early(proxy)
    connection = await Connection.open(proxy.port)
    heads = []
    for fields in [(), (), ("x-sidecar-max-attempts: 2",)]:
        connection.send(get("/x", "X-Request-Id: same", *fields))
        lines, body = await connection.response()
        assert body == b"hello"
        heads.append([line for line in lines if not line.startswith(b"Date: ")])
    connection.close()
    assert early == ["/x"] and served == [1]
    assert heads[1] == heads[2]
    assert b"X-Name: caf\xe9" in heads[1] and b"Age: 3" in heads[1] and b"x-sidecar-cache: HIT" in heads[1]
    assert [line.split(b":")[0] for line in heads[1][-4:]] == [
        b"X-Request-Id", b"x-sidecar-attempts", b"x-sidecar-upstream-ms", b"Server"]


async def test_each_early_hit_gets_its_own_request_id_and_age(
    proxy: RunningSidecar, upstream: Upstream, clock: Clock, client: aiohttp.ClientSession
) -> None:
    early = count_early(proxy)
    async with client.get(proxy.url + "/item") as response:
        assert response.headers["x-sidecar-cache"] == "MISS"
    clock.advance(7)
    ids = set()
    for _ in range(3):
        async with client.get(proxy.url + "/item") as response:
            assert (response.status, await response.read()) == (200, BODY)
            assert (response.headers["x-sidecar-cache"], response.headers["Age"]) == ("HIT", "7")
            ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 3 and early == ["/item"] * 3
    assert len(upstream.hits_for("/item")) == 1


async def test_pipelined_requests_keep_their_order_when_one_takes_the_usual_path(
    proxy: RunningSidecar, upstream: Upstream
) -> None:
    upstream.on("/other", answer(b"other, fresh", **FRESH))
    upstream.on("/live", answer(b"live, never stored", Cache_Control="no-store"))
    connection = await Connection.open(proxy.port)
    for path in ("/item", "/other"):
        connection.send(get(path))
        await connection.response()
    early = count_early(proxy)
    connection.send(get("/item"), get("/live"), get("/other"), get("/item"))
    answers = [await connection.response() for _ in range(4)]
    connection.close()
    assert [body for _, body in answers] == [BODY, b"live, never stored", b"other, fresh", BODY]
    assert [field(head, "x-sidecar-cache") for head, _ in answers] == ["HIT", "MISS", "HIT", "HIT"]
    # The first is answered as it is parsed; /live is not a hit, and what came after it waits
    # behind it on the usual path.
    assert early == ["/item"]
    assert len(upstream.hits_for("/live")) == 1 and len(upstream.hits_for("/item")) == 1


async def test_a_run_of_pipelined_hits_is_answered_early_in_order(proxy: RunningSidecar, upstream: Upstream) -> None:
    upstream.on("/other", answer(b"other, fresh", **FRESH))
    connection = await Connection.open(proxy.port)
    for path in ("/item", "/other"):
        connection.send(get(path))
        await connection.response()
    early = count_early(proxy)
    connection.send(*(get(path) for path in ["/item", "/other"] * 5))
    bodies = [(await connection.response())[1] for _ in range(10)]
    connection.close()
    assert bodies == [BODY, b"other, fresh"] * 5
    assert early == ["/item", "/other"] * 5


@pytest.mark.parametrize(("fields", "status", "label"), [
    (("x-sidecar-timeout-ms: soon",), 400, "BYPASS"),  # refused at admission, as without the early path
    (("x-sidecar-timeout-ms: 5000",), 200, "HIT"),
    (('If-None-Match: "v1"',), 304, "HIT"),  # the caller's own conditional, answered by the stack
    (("Cache-Control: no-cache",), 200, "REVALIDATED"),
    (("Cache-Control: max-age=3600",), 200, "HIT"),  # anything said about caching: the stack decides
    (("Connection: close",), 200, "HIT"),
    (("Connection: X-Custom",), 200, "HIT"),
    (("Expect: 100-continue",), 200, "HIT"),
], ids=["bad-limit", "good-limit", "conditional", "no-cache", "max-age", "close", "connection-names", "expect"])
async def test_requests_that_need_more_than_the_entry_take_the_usual_path(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, fields: tuple[str, ...], status: int,
    label: str,
) -> None:
    upstream.on("/item", answer(BODY, **FRESH), answer(b"", status=304, ETag='"v1"', Cache_Control="max-age=60"))
    async with client.get(proxy.url + "/item") as response:
        assert response.headers["x-sidecar-cache"] == "MISS"
    early = count_early(proxy)
    connection = await Connection.open(proxy.port)
    connection.send(get("/item", *fields))
    head, body = await connection.response()
    assert (int(head[0].split()[1]), field(head, "x-sidecar-cache")) == (status, label)
    if status == 200:
        assert body == BODY
    if "Connection: close" in fields:
        assert field(head, "Connection") == "close" and await connection.closed()
    connection.close()
    assert early == []


async def test_head_and_a_route_without_cache_take_the_usual_path(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/item", answer(BODY, **FRESH))
    proxy = await sidecar_factory(f"""
upstreams:
  up: {{endpoints: ["{upstream.url}"]}}
routes:
  - name: cached
    match: {{path_prefix: /cached/}}
    strip_prefix: true
    upstream: up
    cache: {{}}
  - name: plain
    match: {{path_prefix: /}}
    upstream: up
""")
    early = count_early(proxy)
    for _ in range(2):
        async with client.get(proxy.url + "/item") as response:
            assert (response.status, "x-sidecar-cache" in response.headers) == (200, False)
    async with client.get(proxy.url + "/cached/item") as response:
        assert response.headers["x-sidecar-cache"] == "MISS"
    async with client.head(proxy.url + "/cached/item") as response:
        assert (response.headers["x-sidecar-cache"], response.headers["Content-Length"]) == ("HIT", str(len(BODY)))
    async with client.get(proxy.url + "/cached/item") as response:
        assert (response.headers["x-sidecar-cache"], await response.read()) == ("HIT", BODY)
    assert early == ["/cached/item"]
    assert len(upstream.hits_for("/item")) == 3


async def test_a_vary_on_a_field_the_sidecar_rewrites_takes_the_usual_path(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    # The upstream sees X-Forwarded-For with the caller's address appended: only the stack's
    # view of the request can pick the variant.
    upstream.on("/by-peer", answer(b"per peer", Vary="X-Forwarded-For", **FRESH))
    upstream.on("/by-encoding", answer(b"per encoding", Vary="Accept-Encoding", **FRESH))
    early = count_early(proxy)
    labels = []
    for path, fields in [("/by-peer", {}), ("/by-peer", {}), ("/by-encoding", {"Accept-Encoding": "gzip"}),
                         ("/by-encoding", {"Accept-Encoding": "gzip"}), ("/by-encoding", {"Accept-Encoding": "br"})]:
        async with client.get(proxy.url + path, headers=fields) as response:
            labels.append(response.headers["x-sidecar-cache"])
    assert labels == ["MISS", "HIT", "MISS", "HIT", "MISS"]
    assert early == ["/by-encoding"]


async def test_early_hits_are_counted_and_logged_like_any_answer(
    sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock, client: aiohttp.ClientSession
) -> None:
    upstream.on("/item", answer(BODY, **FRESH))
    proxy = await sidecar_factory(cached_yaml(upstream.url) + "log: {access: true}\n", wall_clock=clock)
    early = count_early(proxy)
    for _ in range(4):
        async with client.get(proxy.url + "/item?q=1", headers={"X-Request-Id": "r"}) as response:
            assert response.status == 200
    assert len(early) == 3
    assert proxy.metric("sidecar_cache_requests_total", route="main", result="hit") == 3
    assert proxy.metric("sidecar_cache_requests_total", route="main", result="miss") == 1
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="200") == 4
    assert proxy.metric("sidecar_request_duration_seconds_count", route="main") == 4
    assert proxy.metric("sidecar_in_flight_requests", route="main") == 0
    lines = proxy.access_log()
    assert [(line["route"], line["status"], line["path"], line["request_id"], line["attempts"]) for line in lines] == [
        ("main", 200, "/item", "r", 1)] + [("main", 200, "/item", "r", 0)] * 3
    assert all(line["breaker"] is None and line["error"] is None for line in lines)
    async with client.get(proxy.admin + "/api/v1/routes") as response:
        (route,) = (await response.json())["routes"]
    assert route["cache_stats"]["results"] == {"miss": 1, "hit": 3}


async def test_a_connection_kept_busy_by_early_hits_stays_open_and_closes_once_idle(
    sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock
) -> None:
    upstream.on("/item", answer(BODY, **FRESH))
    proxy = await sidecar_factory(cached_yaml(upstream.url) + "server: {keepalive_timeout: 300ms}\n", wall_clock=clock)
    connection = await Connection.open(proxy.port)
    connection.send(get("/item"))
    await connection.response()
    early = count_early(proxy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(40):  # bounded; about 0.8 s of traffic, well past the keep-alive timeout
        connection.send(get("/item"))
        assert (await connection.response())[1] == BODY
        if loop.time() - started > 0.8:
            break
        await asyncio.sleep(0.02)  # the pace of this caller, not a wait for the sidecar
    assert len(early) >= 2
    assert await connection.closed()  # idle for keepalive_timeout after its last answer
    connection.close()


async def test_a_caller_that_takes_none_of_an_early_answer_is_disconnected_after_send_timeout(
    sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock
) -> None:
    # More than a small receive buffer and the socket's send buffer (up to tcp_wmem's 4 MiB) take.
    big = b"x" * (8 << 20)
    upstream.on("/big", answer(big, **FRESH))
    proxy = await sidecar_factory(
        cached_yaml(upstream.url, max_entry="16MiB") + "server: {send_timeout: 300ms, keepalive_timeout: 60s}\n",
        wall_clock=clock,
    )
    priming = await Connection.open(proxy.port)
    priming.send(get("/big"))
    assert (await priming.response())[1] == big
    priming.close()
    early = count_early(proxy)
    server = guarded_server(proxy)
    await wait_until(lambda: proxy.client_connections() == 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    try:
        await wait_until(lambda: len(server.connections) == 1)
        sock.send(get("/big"))  # and never read
        await wait_until(lambda: early == ["/big"])
        (handler,) = server.connections
        assert handler.transport is not None and handler.transport.get_write_buffer_size() > 0
        await wait_until(lambda: not server.connections)  # aborted; with keepalive_timeout 60s nothing else would
    finally:
        sock.close()


async def test_a_reload_turns_early_answers_on_and_off_with_the_cache(
    sidecar_factory: SidecarFactory, upstream: Upstream, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    plain = cached_yaml(upstream.url).split("cache:")[0]
    proxy = await sidecar_factory(plain, config_file=config)
    assert guarded_server(proxy).early_answer is None  # no cached route: nothing is offered
    text = config.read_text()
    config.write_text(text + "    cache: {}\n")
    await proxy.sidecar.reload_from_file()
    assert guarded_server(proxy).early_answer is not None
    config.write_text(text)
    await proxy.sidecar.reload_from_file()
    assert guarded_server(proxy).early_answer is None


def test_a_head_with_a_line_break_is_never_prepared_nor_answered() -> None:
    assert prepare_head(200, "OK", [("Content-Length", "2"), ("X-A", "one\r\nX-Injected: two")], b"ok") is None
    head = prepare_head(200, "OK", [("Content-Length", "2"), ("Date", "Tue, 01 Dec 2026 08:00:00 GMT")], b"ok")
    assert head is not None and head.has_date and not head.has_server
    assert early_answer(head, ["X-Request-Id: a\r\nX-Injected: b\r\n"], b"ok") is None
    whole = early_answer(head, ["X-Request-Id: a\r\n"], b"ok")
    assert whole is not None and whole.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: ")
    assert whole.endswith(b"X-Request-Id: a\r\nServer: " + whole.split(b"Server: ")[1].split(b"\r\n")[0]
                          + b"\r\n\r\nok")



@pytest.mark.parametrize(("request_bytes", "status", "closes"), [
    (b"GET /item HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     True),
    (b"GET /item HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n", 400, True),
    (b"GET /item HTTP/1.1\r\n\r\n", 400, True),  # no Host
    (b"GET /item HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, True),
    (b"GET /item HTTP/2.0\r\nHost: svc\r\n\r\n", 505, True),
    (b"GET /item HTTP/1.1\r\nHost: svc\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n", 400, True),  # underscore: reject
    (b"GET /item HTTP/1.1\r\nHost: svc\r\nx-sidecar-max-attempts: \xc2\xb2\r\n\r\n", 400, False),
], ids=["cl-and-te", "two-hosts", "no-host", "gzip-chunked", "http2", "underscore", "superscript"])
async def test_a_hostile_request_for_a_fresh_entry_is_refused_as_on_any_route(
    sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock, request_bytes: bytes, status: int,
    closes: bool,
) -> None:
    upstream.on("/item", answer(BODY, **FRESH))
    proxy = await sidecar_factory(cached_yaml(upstream.url) + "server: {underscore_headers: reject}\n",
                                  wall_clock=clock)
    connection = await Connection.open(proxy.port)
    connection.send(get("/item"))
    assert (await connection.response())[1] == BODY
    early = count_early(proxy)
    connection.send(get("/item"))  # a fresh hit on this connection first: answered early
    head, body = await connection.response()
    assert (head[0], field(head, "x-sidecar-cache"), body) == (b"HTTP/1.1 200 OK", "HIT", BODY)
    connection.send(request_bytes)
    head, _ = await connection.response()
    assert int(head[0].split()[1]) == status and head[0].startswith(b"HTTP/1.1 ")
    if closes:
        assert await connection.closed()
    connection.close()
    assert early == ["/item"]
    assert len(upstream.hits_for("/item")) == 1


async def test_routes_told_apart_by_host_keep_their_own_entries(
    sidecar_factory: SidecarFactory, upstream_factory: Callable[[str], Awaitable[Upstream]], clock: Clock,
    client: aiohttp.ClientSession,
) -> None:
    first, second = await upstream_factory("first"), await upstream_factory("second")
    first.on("/item", answer(b"first", **FRESH))
    second.on("/item", answer(b"second", **FRESH))
    proxy = await sidecar_factory(f"""
upstreams:
  first: {{endpoints: ["{first.url}"]}}
  second: {{endpoints: ["{second.url}"]}}
routes:
  - {{name: first, match: {{host: first.example, path_prefix: /}}, upstream: first, cache: {{}}}}
  - {{name: second, match: {{path_prefix: /}}, upstream: second, cache: {{}}}}
""", wall_clock=clock)
    early = count_early(proxy)
    bodies = []
    for host in ["first.example", "second.example", "first.example", "second.example", "FIRST.example:80"]:
        async with client.get(proxy.url + "/item", headers={"Host": host}) as response:
            bodies.append(await response.read())
    assert bodies == [b"first", b"second", b"first", b"second", b"first"]
    assert early == ["/item"] * 3
    assert (len(first.hits), len(second.hits)) == (1, 1)
