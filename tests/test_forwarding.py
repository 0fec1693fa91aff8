"""Forwarding: routes, paths, headers and bodies reach the other side exactly as they should."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import aiohttp
from aiohttp import web

from tests.conftest import Hit, SidecarFactory, Upstream, raw_exchange, route_yaml


async def test_longest_prefix_wins_and_strip_prefix_keeps_path_absolute_with_query(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    payments = await upstream_factory("payments")
    general = await upstream_factory("general")
    proxy = await sidecar_factory(f"""
        upstreams:
          payments: {{endpoints: ["{payments.url}"]}}
          general: {{endpoints: ["{general.url}"]}}
        routes:
          - {{name: general, match: {{path_prefix: /}}, upstream: general}}
          - {{name: payments, match: {{path_prefix: /payments/}}, upstream: payments, strip_prefix: true}}
    """)
    async with client.get(proxy.url + "/payments/charge?x=1") as response:
        assert response.status == 200
        assert await response.text() == "GET /charge?x=1"
    async with client.get(proxy.url + "/payments/") as response:
        assert await response.text() == "GET /"
    async with client.get(proxy.url + "/paymentsX") as response:
        assert await response.text() == "GET /paymentsX"
    assert [hit.target for hit in payments.hits] == ["/charge?x=1", "/"]
    assert [hit.target for hit in general.hits] == ["/paymentsX"]


async def test_percent_encoding_and_query_reach_upstream_byte_for_byte(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    target = "/a%2Fb/c%20d/%7Euser?q=a%2Bb&empty=&x=%E2%9C%93&x=2"
    request = f"GET {target} HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n".encode()
    answer = await raw_exchange(proxy.port, request)
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.hits[0].target == target


async def test_host_match_picks_the_route_for_that_host(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    a = await upstream_factory("a")
    b = await upstream_factory("b")
    proxy = await sidecar_factory(f"""
        upstreams:
          a: {{endpoints: ["{a.url}"]}}
          b: {{endpoints: ["{b.url}"]}}
        routes:
          - {{name: any-host, match: {{path_prefix: /}}, upstream: a}}
          - {{name: api-host, match: {{path_prefix: /, host: API.example.com}}, upstream: b}}
    """)
    async with client.get(proxy.url + "/x", headers={"Host": "api.example.com:15001"}) as response:
        assert response.status == 200
    async with client.get(proxy.url + "/y", headers={"Host": "other.example.com"}) as response:
        assert response.status == 200
    assert [hit.target for hit in b.hits] == ["/x"]
    assert [hit.target for hit in a.hits] == ["/y"]
    assert proxy.metric("sidecar_requests_total", route="api-host", method="GET", code="200") == 1


async def test_host_match_accepts_ipv6_literals_and_names_with_ports(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    a = await upstream_factory("a")
    v6 = await upstream_factory("v6")
    named = await upstream_factory("named")
    proxy = await sidecar_factory(f"""
        upstreams:
          a: {{endpoints: ["{a.url}"]}}
          v6: {{endpoints: ["{v6.url}"]}}
          named: {{endpoints: ["{named.url}"]}}
        routes:
          - {{name: any-host, match: {{path_prefix: /}}, upstream: a}}
          - {{name: v6-host, match: {{path_prefix: /, host: "[::1]"}}, upstream: v6}}
          - {{name: named-host, match: {{path_prefix: /, host: "Example.COM:8080"}}, upstream: named}}
    """)
    for target, host in [("/v6", "[::1]:15001"), ("/v6-bare", "[::1]"), ("/named", "example.com:15001"),
                         ("/other", "[::2]:15001")]:
        async with client.get(proxy.url + target, headers={"Host": host}) as response:
            assert response.status == 200
    assert [hit.target for hit in v6.hits] == ["/v6", "/v6-bare"]
    assert [hit.target for hit in named.hits] == ["/named"]
    assert [hit.target for hit in a.hits] == ["/other"]


async def test_dedicated_listen_port_serves_its_route_for_any_path(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    inventory = await upstream_factory("inventory")
    other = await upstream_factory("other")
    proxy = await sidecar_factory(f"""
        upstreams:
          inventory: {{endpoints: ["{inventory.url}"]}}
          other: {{endpoints: ["{other.url}"]}}
        routes:
          - {{name: other, match: {{path_prefix: /}}, upstream: other}}
          - {{name: inventory, listen: "127.0.0.1:{unused_tcp_port}", upstream: inventory}}
    """)
    async with client.get(f"http://127.0.0.1:{unused_tcp_port}/items/7") as response:
        assert response.status == 200
    async with client.get(proxy.url + "/items/8") as response:
        assert response.status == 200
    assert [hit.target for hit in inventory.hits] == ["/items/7"]
    assert [hit.target for hit in other.hits] == ["/items/8"]


async def test_unmatched_request_gets_404_json_and_is_never_forwarded(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - {{name: api, match: {{path_prefix: /api/}}, upstream: up}}
    """)
    async with client.post(proxy.url + "/elsewhere", data=b"payload") as response:
        assert response.status == 404
        assert response.headers["x-sidecar-error"] == "no_route"
        assert response.headers["Content-Type"] == "application/json"
        body = await response.json()
    assert body == {"error": "no_route", "message": "no route matches POST /elsewhere", "route": None,
                    "retryable": False, "attempts": 0}
    assert upstream.hits == []
    assert proxy.metric("sidecar_requests_total", route="_no_route", method="POST", code="404") == 1


async def test_gzip_body_arrives_byte_identical_with_its_content_encoding(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    compressed = gzip.compress(b"hello " * 1000)

    async def gzipped(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        hit.body = await request.content.read()
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    upstream.on("/gz", gzipped)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.post(proxy.url + "/gz", data=compressed, headers={"Content-Encoding": "gzip"}) as response:
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(compressed))
        assert await response.read() == compressed
    hit = upstream.hits[0]
    assert hit.body == compressed
    assert hit.headers["Content-Encoding"] == "gzip"


async def test_upstream_sees_only_headers_the_caller_sent_plus_forwarding_headers(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = (
        b"GET /h HTTP/1.1\r\nHost: app.local:15001\r\nX-Custom: 1\r\n"
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nConnection: close\r\n\r\n"
    )
    await raw_exchange(proxy.port, request)
    headers = upstream.hits[0].headers
    assert sorted(name.lower() for name in headers) == sorted([
        "host", "x-custom", "traceparent", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "x-request-id",
    ])
    assert headers["Host"] == f"127.0.0.1:{upstream.port}"
    assert headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "app.local:15001"


async def test_x_forwarded_for_is_appended_to_the_callers_chain(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/", headers={"X-Forwarded-For": "203.0.113.7"}):
        pass
    assert upstream.hits[0].headers.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]


async def test_hop_by_hop_headers_are_removed_in_both_directions(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    async def hop_response(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(text="ok", headers={
            "Keep-Alive": "timeout=5", "X-Private-Hop": "1", "Connection": "X-Private-Hop",
            "Proxy-Authenticate": "Basic", "Trailer": "X-Checksum", "Upgrade": "h2c", "X-End": "kept",
        })

    upstream.on("/hop", hop_response)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = (
        b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: 300\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nUpgrade: websocket\r\nX-Keep: yes\r\n\r\n"
    )
    answer = (await raw_exchange(proxy.port, request)).decode("latin-1")
    seen = upstream.hits[0].headers
    for name in ("X-Drop-Me", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in seen, name
    assert seen["X-Keep"] == "yes"
    head = answer.split("\r\n\r\n")[0].lower()
    for name in ("keep-alive:", "x-private-hop:", "proxy-authenticate:", "trailer:", "upgrade:"):
        assert name not in head, name
    assert "x-end: kept" in head


async def test_a_usual_header_named_by_connection_is_still_removed(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    # Common names skip lower-casing on the hot path (headers.USUAL_END_TO_END); a Connection
    # header naming one must still drop it, both ways.
    async def names_etag(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Connection": "ETag", "ETag": '"v1"', "Vary": "Accept"})

    upstream.on("/usual", names_etag)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = b"GET /usual HTTP/1.1\r\nHost: x\r\nConnection: close, Cookie\r\nCookie: a=1\r\nAccept: */*\r\n\r\n"
    answer = (await raw_exchange(proxy.port, request)).decode("latin-1")
    seen = upstream.hits[0].headers
    assert "Cookie" not in seen
    assert seen["Accept"] == "*/*"
    head = answer.split("\r\n\r\n")[0].lower()
    assert "etag:" not in head
    assert "vary: accept" in head


async def test_request_id_is_created_when_absent_and_kept_when_present(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/") as response:
        created = response.headers["X-Request-Id"]
    async with client.get(proxy.url + "/", headers={"X-Request-Id": "caller-id-1"}) as response:
        assert response.headers["X-Request-Id"] == "caller-id-1"
    assert len(created) == 32
    assert [hit.headers["X-Request-Id"] for hit in upstream.hits] == [created, "caller-id-1"]


async def test_head_204_and_304_have_no_body(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    async def sized(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234)

    async def no_content(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=204)

    async def not_modified(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    upstream.on("/sized", sized)
    upstream.on("/204", no_content)
    upstream.on("/304", not_modified)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    # Two requests on one connection: any stray body bytes would corrupt the second response.
    for method, path, status in (("HEAD", "/sized", 200), ("GET", "/204", 204), ("GET", "/304", 304)):
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = await raw_exchange(proxy.port, request.encode())
        first, second = answer.split(b"HTTP/1.1 ", 2)[1:]
        assert first.startswith(str(status).encode())
        assert first.endswith(b"\r\n\r\n"), first
        if method == "HEAD":
            assert b"Content-Length: 1234" in first
        assert second.startswith(b"200") and second.endswith(b"GET /after")


async def test_chunked_upstream_response_stays_valid_chunked(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    async def chunked(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for part in (b"alpha", b"beta", b"gamma"):
            await response.write(part)
        return response

    upstream.on("/chunked", chunked)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")
    decoded, rest = b"", body
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        decoded, rest = decoded + rest[:size], rest[size + 2:]
    assert decoded == b"alphabetagamma"


async def test_redirects_are_passed_back_not_followed(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def redirect(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    upstream.on("/old", redirect)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/old", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"
    assert [hit.target for hit in upstream.hits] == ["/old"]


async def test_endpoints_are_used_round_robin(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    first = await upstream_factory("first")
    second = await upstream_factory("second")
    proxy = await sidecar_factory(f"""
        upstreams:
          pair: {{endpoints: ["{first.url}", "{second.url}"]}}
        routes:
          - {{name: pair, match: {{path_prefix: /}}, upstream: pair}}
    """)
    for number in range(6):
        async with client.get(f"{proxy.url}/{number}") as response:
            assert response.status == 200
    assert [hit.target for hit in first.hits] == ["/0", "/2", "/4"]
    assert [hit.target for hit in second.hits] == ["/1", "/3", "/5"]


async def test_upstream_connections_are_pooled_with_keep_alive(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    for _ in range(10):
        async with client.get(proxy.url + "/") as response:
            await response.read()
    assert len(upstream.hits) == 10
    assert len({hit.peer for hit in upstream.hits}) == 1


async def test_server_sent_events_reach_the_caller_head_first_then_one_by_one(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    received_head, received_first = asyncio.Event(), asyncio.Event()

    async def events(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # Each step waits until the caller has the one before: a proxy that held the head
        # back for a body, or buffered an event, would make this time out.
        async with asyncio.timeout(5):
            await received_head.wait()
        await response.write(b"data: one\n\n")
        async with asyncio.timeout(5):
            await received_first.wait()
        await response.write(b"data: two\n\n")
        return response

    upstream.on("/events", events)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        received_head.set()
        assert await response.content.readuntil(b"\n\n") == b"data: one\n\n"
        received_first.set()
        assert await response.content.readuntil(b"\n\n") == b"data: two\n\n"
        assert await response.read() == b""


async def test_request_body_streams_to_upstream_before_the_caller_finishes(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    first_chunk_arrived = asyncio.Event()

    async def streaming_reader(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        hit.body = await request.content.readexactly(5)
        first_chunk_arrived.set()
        hit.body += await request.read()
        return web.Response(text=f"got {len(hit.body)}")

    async def body():  # type: ignore[no-untyped-def]
        yield b"first"
        async with asyncio.timeout(5):
            await first_chunk_arrived.wait()
        yield b"-second"

    upstream.on("/upload", streaming_reader)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.post(proxy.url + "/upload", data=body()) as response:
        assert response.status == 200
        assert await response.text() == "got 12"
    assert upstream.hits[0].body == b"first-second"
    assert upstream.hits[0].headers["Transfer-Encoding"] == "chunked"


async def test_large_bodies_pass_intact_both_ways_with_content_length(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def mirror(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        hit.body = await request.content.read()
        return web.Response(body=hit.body[::-1])

    upstream.on("/mirror", mirror)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.put(proxy.url + "/mirror", data=payload) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(payload))
        returned = await response.read()
    assert upstream.hits[0].headers["Content-Length"] == str(len(payload))
    assert hashlib.sha256(upstream.hits[0].body).digest() == hashlib.sha256(payload).digest()
    assert returned == payload[::-1]


async def test_upstream_error_statuses_pass_through_untouched(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def broken(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=503, body=b'{"upstream":"sad"}', headers={"Retry-After": "3",
                                                                               "Content-Type": "application/json"})

    upstream.on("/sad", broken)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/sad") as response:
        assert response.status == 503
        assert "x-sidecar-error" not in response.headers
        assert response.headers["Retry-After"] == "3"
        assert json.loads(await response.read()) == {"upstream": "sad"}
    assert len(upstream.hits) == 1
