"""Hostile or broken requests: a clear 4xx, the connection closed where framing is in doubt, nothing forwarded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import SidecarFactory, Upstream, raw_exchange, route_yaml, wait_until

SMUGGLING = {
    "content-length-and-transfer-encoding":
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "signed-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obfuscated-transfer-encoding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding-list": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "space-before-colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "negative-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "missing-host": b"GET / HTTP/1.1\r\n\r\n",
    "duplicate-host": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "http10-with-transfer-encoding":
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


def head_of(answer: bytes) -> str:
    return answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_shapes_get_400_a_closed_connection_and_reach_nobody(
    sidecar_factory: SidecarFactory, upstream: Upstream, request_bytes: bytes
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, request_bytes)  # returns only once the sidecar closes
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:100]
    assert "x-sidecar-error: bad_request" in head_of(answer)
    assert b'"error": "bad_request"' in answer
    assert upstream.hits == []


@pytest.mark.parametrize(("request_bytes", "status", "kind"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431,
     "header_too_large"),
], ids=["long-uri", "huge-uri", "large-header", "many-headers"])
async def test_request_line_and_header_limits_answer_414_and_431(
    sidecar_factory: SidecarFactory, upstream: Upstream, request_bytes: bytes, status: int, kind: str
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, request_bytes)
    assert answer[9:13] == f"{status} ".encode(), answer[:100]
    assert f"x-sidecar-error: {kind}" in head_of(answer)
    assert upstream.hits == []


async def test_limits_are_configurable(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    proxy = await sidecar_factory("server: {max_request_line: 64KiB, max_header_size: 16KiB, max_headers: 200}\n"
                                  + route_yaml(upstream.url))
    request = (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n"
               + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"Connection: close\r\n\r\n")
    assert (await raw_exchange(proxy.port, request)).startswith(b"HTTP/1.1 200 ")


async def test_body_over_max_body_is_413_by_content_length_and_while_streaming(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url, "limits: {max_body: 1KiB}\nretries: {attempts: 1}"))
    async with client.post(proxy.url + "/x", data=b"z" * 2048) as response:
        assert response.status == 413
        assert response.headers["x-sidecar-error"] == "payload_too_large"
    assert upstream.hits == []

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(8):
            yield b"z" * 512

    async with client.post(proxy.url + "/x", data=chunks()) as response:
        assert response.status == 413
    assert all(hit.body == b"" for hit in upstream.hits)  # the upstream never got a whole body
    async with client.post(proxy.url + "/x", data=b"z" * 1024) as response:
        assert response.status == 200


async def test_slow_header_senders_are_closed_while_fast_clients_are_served(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory("server: {header_timeout: 300ms}\n" + route_yaml(upstream.url))
    slow = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _reader, writer in slow:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    closed_at: list[float] = []

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(50):  # one header line every 50ms, never the blank line
            if reader.at_eof():
                break
            writer.write(b"X-Drip: 1\r\n")
            try:
                async with asyncio.timeout(0.05):
                    if await reader.read(1) == b"":
                        break
            except TimeoutError:
                continue
        closed_at.append(loop.time() - started)

    dripping = [asyncio.create_task(drip(reader, writer)) for reader, writer in slow]
    for _ in range(5):  # served meanwhile
        async with client.get(proxy.url + "/fast") as response:
            assert response.status == 200
    await asyncio.gather(*dripping)
    assert len(closed_at) == 20 and max(closed_at) < 2.0  # each closed by the server, not by the loop's end
    assert len(upstream.hits) == 5
    for _, writer in slow:
        writer.close()


@pytest.mark.both_loops  # the refusal is written to the transport directly
async def test_connections_over_the_cap_get_503_and_are_closed(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory("server: {listen_max_connections: 5}\n" + route_yaml(upstream.url))
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(5)]
    await wait_until(lambda: proxy.client_connections() == 5)
    answer = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ") and b"x-sidecar-error: overloaded" in answer
    for _, writer in held:
        writer.close()
        await writer.wait_closed()
    await wait_until(lambda: proxy.client_connections() == 0)
    ok = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 400),
    (b"CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
], ids=["absolute-form", "connect", "asterisk-form"])
async def test_never_an_open_proxy(
    sidecar_factory: SidecarFactory, upstream: Upstream, request_bytes: bytes, status: int
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
    assert upstream.hits == []


async def test_host_header_only_chooses_among_configured_routes(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - {{name: api, match: {{path_prefix: /, host: api.internal}}, upstream: up}}
    """)
    answer = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and upstream.hits == []
    await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: api.internal\r\nConnection: close\r\n\r\n")
    assert [hit.headers["Host"] for hit in upstream.hits] == [f"127.0.0.1:{upstream.port}"]


@pytest.mark.parametrize("path", [
    "/public/../internal/secret", "/public/%2e%2e/internal/secret", "/public/%2E%2e/internal/secret",
    "/public/./x", "/public/%2e/x", "/public/..", "/public/x/..?q=1",
])
async def test_dot_segments_cannot_escape_a_route(
    sidecar_factory: SidecarFactory, upstream_factory, path: str
) -> None:
    public = await upstream_factory("public")
    internal = await upstream_factory("internal")
    proxy = await sidecar_factory(f"""
        upstreams:
          public: {{endpoints: ["{public.url}"]}}
          internal: {{endpoints: ["{internal.url}"]}}
        routes:
          - {{name: public, match: {{path_prefix: /public/}}, upstream: public}}
          - {{name: internal, match: {{path_prefix: /internal/}}, upstream: internal}}
    """)
    answer = await raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and b"segment" in answer
    assert public.hits == [] and internal.hits == []


async def test_paths_are_matched_as_sent(sidecar_factory: SidecarFactory, upstream_factory) -> None:
    public = await upstream_factory("public")
    internal = await upstream_factory("internal")
    proxy = await sidecar_factory(f"""
        upstreams:
          public: {{endpoints: ["{public.url}"]}}
          internal: {{endpoints: ["{internal.url}"]}}
        routes:
          - {{name: public, match: {{path_prefix: /public/}}, upstream: public}}
          - {{name: internal, match: {{path_prefix: /internal/}}, upstream: internal}}
    """)
    for path, status in (("//internal/x", 404), ("/%69nternal/x", 404), ("/public/..hidden", 200),
                         ("/public//internal/x", 200)):
        answer = await raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), path
    assert internal.hits == []
    assert [hit.target for hit in public.hits] == ["/public/..hidden", "/public//internal/x"]


async def test_idle_keep_alive_connections_are_closed_after_the_keepalive_timeout(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory("server: {keepalive_timeout: 200ms}\n" + route_yaml(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert await reader.read() == b""  # the sidecar closes the idle connection
    writer.close()
    assert [hit.target for hit in upstream.hits] == ["/first"]


async def test_http10_request_without_host_matches_no_host_route(
    sidecar_factory: SidecarFactory, upstream_factory: Callable[[str], Awaitable[Upstream]]
) -> None:
    # aiohttp's request.host would answer the listener's own address (127.0.0.1:port) here.
    by_host, catch_all = await upstream_factory("by_host"), await upstream_factory("catch_all")
    proxy = await sidecar_factory(f"""
        upstreams:
          by_host: {{endpoints: ["{by_host.url}"]}}
          catch_all: {{endpoints: ["{catch_all.url}"]}}
        routes:
          - {{name: by_host, match: {{host: 127.0.0.1, path_prefix: /}}, upstream: by_host}}
          - {{name: catch_all, match: {{path_prefix: /}}, upstream: catch_all}}
    """)
    answer = await raw_exchange(proxy.port, b"GET /who HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200"), answer[:100]
    assert (len(by_host.hits), len(catch_all.hits)) == (0, 1)
