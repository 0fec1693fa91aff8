"""Concurrency limits (bulkheads): a full route says `overloaded` at once, and never slows another route."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Gate, Hit, RunningSidecar, SidecarFactory, Upstream, answering, drop_connection, wait_until
from tests.helpers import status_of


def limited(upstream: Upstream, limits: str) -> str:
    return f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: up
            limits: {limits}
    """


def rejections(proxy: RunningSidecar, limit: str) -> float:
    return proxy.metric("sidecar_limit_rejections_total", route="main", limit=limit)


async def test_over_max_concurrent_gets_overloaded_at_once_and_is_not_retried(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(limited(upstream, "{max_concurrent: 2}"))
    held = [asyncio.create_task(status_of(client, proxy.url + "/held")) for _ in range(2)]
    await gate.until_waiting(2)
    async with client.get(proxy.url + "/held") as response:
        assert response.status == 503
        assert response.headers["x-sidecar-error"] == "overloaded"
        assert (await response.json())["attempts"] == 0
    assert len(upstream.hits) == 2
    assert rejections(proxy, "concurrent") == 1
    gate.release.set()
    assert await asyncio.gather(*held) == [(200, None), (200, None)]
    assert await status_of(client, proxy.url + "/held") == (200, None)  # slots come back


async def test_every_way_a_request_can_fail_gives_its_slot_back(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/reset", drop_connection)
    upstream.on("/sick", answering(503))
    proxy = await sidecar_factory(limited(upstream, "{max_concurrent: 1, max_pending: 0}") + """
            circuit_breaker: {failure_threshold: 3, reset_timeout: 30s}
            retries: {attempts: 1}
    """)
    # With one slot, a failure that kept its slot would make every later request `overloaded`.
    assert await status_of(client, proxy.url + "/reset") == (502, "upstream_reset")
    assert await status_of(client, proxy.url + "/sick") == (503, None)
    assert await status_of(client, proxy.url + "/reset") == (502, "upstream_reset")  # opens the breaker
    assert await status_of(client, proxy.url + "/sick") == (503, "circuit_open")
    assert await status_of(client, proxy.url + "/sick") == (503, "circuit_open")
    async with client.get(proxy.url + "/sick", headers={"x-sidecar-max-attempts": "x"}) as response:
        assert response.status == 400  # refused before any layer
    assert rejections(proxy, "concurrent") == 0
    assert len(upstream.hits) == 3


async def test_pending_queue_waits_for_a_slot_then_times_out(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(limited(upstream, "{max_concurrent: 1, max_pending: 1, queue_timeout: 150ms}"))
    first = asyncio.create_task(status_of(client, proxy.url + "/held"))
    await gate.until_waiting(1)
    queued = asyncio.create_task(status_of(client, proxy.url + "/held"))
    await wait_until(lambda: proxy.metric("sidecar_in_flight_requests", route="main") == 2)
    assert await status_of(client, proxy.url + "/held") == (503, "overloaded")  # the queue is full
    assert rejections(proxy, "pending") == 1
    assert await queued == (503, "overloaded")  # waited queue_timeout for the slot
    assert rejections(proxy, "queue_timeout") == 1
    gate.release.set()
    assert await first == (200, None)
    assert len(upstream.hits) == 1


async def test_a_queued_request_gets_the_slot_when_one_frees(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(limited(upstream, "{max_concurrent: 1, max_pending: 1, queue_timeout: 5s}"))
    first = asyncio.create_task(status_of(client, proxy.url + "/held"))
    await gate.until_waiting(1)
    queued = asyncio.create_task(status_of(client, proxy.url + "/held"))
    await wait_until(lambda: proxy.metric("sidecar_in_flight_requests", route="main") == 2)
    assert len(upstream.hits) == 1
    gate.release.set()
    assert await asyncio.gather(first, queued) == [(200, None), (200, None)]
    assert len(upstream.hits) == 2


async def test_a_streaming_response_holds_its_slot_until_complete(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    finish = asyncio.Event()

    async def stream(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        async with asyncio.timeout(5):
            await finish.wait()
        return response

    upstream.on("/events", stream)
    proxy = await sidecar_factory(limited(upstream, "{max_concurrent: 1}"))
    async with client.get(proxy.url + "/events") as response:
        assert await response.content.readuntil(b"\n\n") == b"data: 1\n\n"
        assert await status_of(client, proxy.url + "/other") == (503, "overloaded")
        finish.set()
        await response.read()
    assert await status_of(client, proxy.url + "/other") == (200, None)


async def test_a_hanging_route_does_not_slow_another_route(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    hanging = await upstream_factory("hanging")
    healthy = await upstream_factory("healthy")
    gate = Gate()
    hanging.on("/a", gate)
    proxy = await sidecar_factory(f"""
        upstreams:
          hanging: {{endpoints: ["{hanging.url}"]}}
          healthy: {{endpoints: ["{healthy.url}"]}}
        routes:
          - {{name: a, match: {{path_prefix: /a}}, upstream: hanging, limits: {{max_concurrent: 5}}}}
          - {{name: b, match: {{path_prefix: /b}}, upstream: healthy}}
    """)
    flood = [asyncio.create_task(status_of(client, proxy.url + "/a")) for _ in range(20)]
    await gate.until_waiting(5)
    for _ in range(10):  # route b answers normally while a is full and hanging
        assert await status_of(client, proxy.url + "/b") == (200, None)
    assert not gate.release.is_set() and gate.waiting == 5
    gate.release.set()
    results = await asyncio.gather(*flood)
    assert results.count((200, None)) == 5
    assert results.count((503, "overloaded")) == 15
    assert proxy.metric("sidecar_limit_rejections_total", route="a", limit="concurrent") == 15


async def test_fallback_is_served_when_overloaded(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: up
            limits: {{max_concurrent: 1}}
            fallback: {{status: 429, body: "slow down"}}
    """)
    held = asyncio.create_task(status_of(client, proxy.url + "/held"))
    await gate.until_waiting(1)
    async with client.get(proxy.url + "/held") as response:
        assert response.status == 429
        assert await response.text() == "slow down"
        assert response.headers["x-sidecar-error"] == "overloaded"
    gate.release.set()
    assert await held == (200, None)


@pytest.mark.parametrize(("route_timeouts", "caller_headers"), [
    ("{total: 15s}", {"x-sidecar-timeout-ms": "100"}),  # the caller's own deadline
    ("{total: 100ms}", {}),  # the route's total deadline
])
async def test_the_request_deadline_bounds_the_wait_for_a_slot(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession,
    route_timeouts: str, caller_headers: dict[str, str],
) -> None:
    finish = asyncio.Event()

    async def stream(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse()  # headers at once: `total` is met, the slot stays held
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        async with asyncio.timeout(10):
            await finish.wait()
        return response

    upstream.on("/events", stream)
    proxy = await sidecar_factory(
        limited(upstream, "{max_concurrent: 1, max_pending: 1, queue_timeout: 30s}") + f"""
            timeouts: {route_timeouts}
    """)
    async with client.get(proxy.url + "/events") as holder:
        assert await holder.content.readuntil(b"\n\n") == b"data: 1\n\n"
        async with asyncio.timeout(5):  # far below queue_timeout: only the deadline can end the wait
            async with client.get(proxy.url + "/other", headers=caller_headers) as response:
                assert response.status == 503
                assert response.headers["x-sidecar-error"] == "overloaded"
                assert "deadline" in (await response.json())["message"]
        assert not finish.is_set()  # the holder still has its slot: the deadline ended the wait
        finish.set()
        await holder.read()
    assert rejections(proxy, "queue_timeout") == 1
    assert [hit.target for hit in upstream.hits] == ["/events"]
