"""Admin API v1: routes, breakers with operator overrides, the event stream, tokens, JSON errors."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
from aiohttp import web

from tests.conftest import Hit, RunningSidecar, SidecarFactory, Upstream, answering, route_yaml, wait_until

sick = answering(503, "sick")


def config(upstream: Upstream, extra_top: str = "", breaker: str = "{failure_threshold: 2, reset_timeout: 30s}") -> str:
    return extra_top + route_yaml(upstream.url, f"""
        retries: {{attempts: 1}}
        circuit_breaker: {breaker}
    """)


async def api(client: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> tuple[int, dict]:
    async with client.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.headers["Content-Type"].startswith("application/json")
        return response.status, await response.json()


async def test_routes_show_effective_policies_and_hide_the_token(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(config(upstream, "admin: {listen: 127.0.0.1:0, token: s3cret}\n"))
    status, body = await api(client, "GET", proxy.admin + "/api/v1/routes")
    assert status == 200
    (route,) = body["routes"]
    assert route["name"] == "main" and route["upstream"]["endpoints"] == [upstream.url]
    assert route["retries"]["attempts"] == 1 and route["timeouts"]["total"] == "15s"
    assert route["circuit_breaker"]["failure_threshold"] == 2
    async with client.get(proxy.admin + "/api/v1/routes") as response:
        assert "s3cret" not in await response.text()


async def test_breakers_say_why_and_until_when_it_is_open(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(config(upstream))
    _, body = await api(client, "GET", proxy.admin + "/api/v1/breakers")
    assert body["breakers"][0]["state"] == "closed" and body["breakers"][0]["opened_at"] is None
    for _ in range(2):
        async with client.get(proxy.url + "/x"):
            pass
    _, body = await api(client, "GET", proxy.admin + "/api/v1/breakers")
    (breaker,) = body["breakers"]
    assert breaker["state"] == "open" and breaker["forced"] is False
    assert breaker["consecutive_failures"] == 2
    assert [failure["kind"] for failure in breaker["recent_failures"]] == ["status_503", "status_503"]
    assert breaker["opened_at"] < breaker["next_probe_at"]


async def test_forced_open_and_closed_are_visible_to_traffic_until_reset(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/sick", sick)
    proxy = await sidecar_factory(config(upstream))
    status, body = await api(client, "POST", proxy.admin + "/api/v1/breakers/main/open")
    assert status == 200 and body["state"] == "open" and body["forced"] is True
    async with client.get(proxy.url + "/ok") as response:
        assert response.headers["x-sidecar-error"] == "circuit_open"
    assert upstream.hits == []
    assert proxy.metric("sidecar_circuit_breaker_forced", route="main") == 1
    assert proxy.metric("sidecar_circuit_breaker_state", route="main", state="open") == 1

    status, body = await api(client, "POST", proxy.admin + "/api/v1/breakers/main/close")
    assert body["state"] == "closed" and body["forced"] is True
    for _ in range(5):  # more failures than the threshold: forced closed stays closed
        async with client.get(proxy.url + "/sick") as response:
            assert response.status == 503 and "x-sidecar-error" not in response.headers
    assert len(upstream.hits) == 5

    status, body = await api(client, "POST", proxy.admin + "/api/v1/breakers/main/reset")
    assert body["state"] == "closed" and body["forced"] is False and body["consecutive_failures"] == 0
    assert proxy.metric("sidecar_circuit_breaker_forced", route="main") == 0
    for _ in range(2):
        async with client.get(proxy.url + "/sick"):
            pass
    assert (await api(client, "GET", proxy.admin + "/api/v1/breakers"))[1]["breakers"][0]["state"] == "open"


async def test_unknown_route_disabled_breaker_unknown_path_and_wrong_method_answer_in_json(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(config(upstream, breaker="{enabled: false}"))
    assert await api(client, "POST", proxy.admin + "/api/v1/breakers/nope/open") == (
        404, {"error": "unknown_route", "message": "no route named nope"})
    status, body = await api(client, "POST", proxy.admin + "/api/v1/breakers/main/open")
    assert status == 409 and body["error"] == "breaker_disabled"
    status, body = await api(client, "GET", proxy.admin + "/api/v2/routes")
    assert status == 404 and body["error"] == "not_found"
    async with client.delete(proxy.admin + "/api/v1/breakers") as response:
        assert response.status == 405
        assert (await response.json())["error"] == "method_not_allowed"
        assert "GET" in response.headers["Allow"]
    status, body = await api(client, "GET", proxy.admin + "/api/v1/breakers")
    assert body["breakers"] == [{"route": "main", "enabled": False, "state": None, "forced": False,
                                 "consecutive_failures": 0, "opened_at": None, "next_probe_at": None,
                                 "recent_failures": []}]


async def test_mutations_need_the_bearer_token_when_one_is_set(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(config(upstream, 'admin: {listen: 127.0.0.1:0, token: "${TOKEN}"}\n'),
                                  env={"TOKEN": "s3cret"})
    url = proxy.admin + "/api/v1/breakers/main/open"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        async with client.post(url, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert (await response.json())["error"] == "unauthorized"
    assert (await api(client, "GET", proxy.admin + "/api/v1/breakers"))[0] == 200  # reads need no token
    status, body = await api(client, "POST", url, headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and body["state"] == "open"


class EventStream:
    """A real SSE client of /api/v1/events."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self) -> dict:
        async with asyncio.timeout(5):
            while True:
                block = (await self.response.content.readuntil(b"\n\n")).decode()
                if block.startswith(":"):
                    continue  # comments: subscription handshake, keepalive
                kind_line, data_line = block.strip().split("\n")
                event = json.loads(data_line.removeprefix("data: "))
                assert kind_line == f"event: {event['kind']}"
                return event


async def subscribe(client: aiohttp.ClientSession, proxy: RunningSidecar) -> EventStream:
    response = await client.get(proxy.admin + "/api/v1/events")
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await response.content.readuntil(b"\n\n") == b": subscribed\n\n"  # live from here
    return EventStream(response)


async def test_event_stream_delivers_breaker_transitions_caused_by_traffic_to_every_client(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(config(upstream))
    streams = [await subscribe(client, proxy) for _ in range(2)]
    for _ in range(2):
        async with client.get(proxy.url + "/x"):
            pass
    for stream in streams:
        event = await stream.next()
        assert (event["kind"], event["route"], event["state"]) == ("breaker", "main", "open")
        assert event["time"].endswith("Z")
        stream.response.close()


async def test_limit_rejection_events_are_rate_limited(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def held(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        async with asyncio.timeout(5):
            await release.wait()
        return web.Response()

    upstream.on("/held", held)
    proxy = await sidecar_factory(route_yaml(upstream.url, "limits: {max_concurrent: 1}"))
    stream = await subscribe(client, proxy)
    first = asyncio.create_task(client.get(proxy.url + "/held"))
    await wait_until(lambda: bool(upstream.hits))
    for _ in range(20):
        async with client.get(proxy.url + "/held") as response:
            assert response.status == 503
    event = await stream.next()
    assert (event["kind"], event["route"], event["limit"], event["suppressed"]) == ("limit_rejected", "main",
                                                                                     "concurrent", 0)
    assert proxy.metric("sidecar_limit_rejections_total", route="main", limit="concurrent") == 20
    release.set()
    (await first).close()
    stream.response.close()


async def test_a_slow_event_client_never_slows_requests_and_is_told_it_lagged(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    host, port = proxy.admin.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that barely reads
    slow.connect((host, int(port)))
    slow.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=slow, limit=4096)
    writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: admin\r\n\r\n")
    async with asyncio.timeout(5):
        await reader.readuntil(b": subscribed\n\n")
    bus = proxy.sidecar.events
    for batch in range(40):  # 20,000 events, with the loop free between batches; the client reads nothing
        for number in range(500):
            bus.publish("test", None, number=batch * 500 + number, padding="x" * 100)
        async with client.get(proxy.url + "/ok") as response:  # traffic is served meanwhile
            assert response.status == 200
    assert proxy.metric("sidecar_admin_events_dropped_total") > 0
    seen = b""
    async with asyncio.timeout(10):  # now read: the stream says how much was lost
        while b"event: lagged" not in seen:
            seen += await reader.read(65536)
    writer.close()
    assert b"event: lagged" in seen
    assert len(upstream.hits) == 40
