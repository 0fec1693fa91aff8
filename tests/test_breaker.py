"""Circuit breakers: open after N failures, fail fast with Retry-After, one probe, then close or re-open."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from tests.conftest import Hit, RunningSidecar, SidecarFactory, Upstream, answering, route_yaml, wait_until
from tests.helpers import get

sick = answering(503, "sick")
ok = answering(200, "ok")


def breaker_yaml(upstream: Upstream, breaker: str, extra: str = "") -> str:
    return route_yaml(upstream.url, f"""
        retries: {{attempts: 1}}
        circuit_breaker: {breaker}
        {extra}
    """)


def state(proxy: RunningSidecar, name: str) -> float:
    return proxy.metric("sidecar_circuit_breaker_state", route="main", state=name)


async def trip(client: aiohttp.ClientSession, proxy: RunningSidecar, times: int) -> None:
    for _ in range(times):
        status, body, _ = await get(client, proxy.url + "/x")
        assert (status, body) == (503, "sick")  # every failure, the tripping one too, is the upstream's own


async def test_opens_after_exactly_n_failures_and_fails_fast_without_touching_the_upstream(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 3, reset_timeout: 10s}"))
    assert state(proxy, "closed") == 1
    await trip(client, proxy, 3)
    assert state(proxy, "open") == 1 and state(proxy, "closed") == 0
    for _ in range(4):
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 503
            assert response.headers["x-sidecar-error"] == "circuit_open"
            assert response.headers["Retry-After"] == "10"
            body = await response.json()
        assert body["error"] == "circuit_open" and body["route"] == "main" and body["attempts"] == 0
    assert len(upstream.hits) == 3
    assert proxy.metric("sidecar_circuit_breaker_rejections_total", route="main") == 4
    assert proxy.metric("sidecar_circuit_breaker_transitions_total", route="main", to="open") == 1


async def test_a_success_resets_the_consecutive_count(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick, sick, ok, sick, sick, ok)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 3}"))
    statuses = [(await get(client, proxy.url + "/x"))[0] for _ in range(6)]
    assert statuses == [503, 503, 200, 503, 503, 200]
    assert state(proxy, "closed") == 1


async def test_4xx_never_counts_unless_listed(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def not_found(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=404)

    async def too_many(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=429)

    upstream.on("/missing", not_found)
    upstream.on("/busy", too_many)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 2, failure_on: [5xx, 429]}"))
    for _ in range(5):
        assert (await get(client, proxy.url + "/missing"))[0] == 404
    assert state(proxy, "closed") == 1
    for _ in range(2):
        assert (await get(client, proxy.url + "/busy"))[0] == 429
    assert state(proxy, "open") == 1


async def test_half_open_admits_exactly_one_probe_then_closes_on_success(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    probe_arrived = asyncio.Event()

    async def slow_ok(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        probe_arrived.set()
        async with asyncio.timeout(5):
            await release.wait()
        return web.Response(text="recovered")

    upstream.on("/x", sick, sick, slow_ok)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 2, reset_timeout: 100ms}"))
    await trip(client, proxy, 2)
    await asyncio.sleep(0.15)  # past reset_timeout

    probe = asyncio.create_task(get(client, proxy.url + "/x"))
    async with asyncio.timeout(5):
        await probe_arrived.wait()
    assert state(proxy, "half_open") == 1
    burst = await asyncio.gather(*(get(client, proxy.url + "/x") for _ in range(10)))
    assert [status for status, _, _ in burst] == [503] * 10
    assert all(headers["x-sidecar-error"] == "circuit_open" for _, _, headers in burst)
    release.set()
    assert (await probe)[:2] == (200, "recovered")
    assert len(upstream.hits) == 3
    assert state(proxy, "closed") == 1
    assert (await get(client, proxy.url + "/x"))[:2] == (200, "recovered")
    assert proxy.metric("sidecar_circuit_breaker_transitions_total", route="main", to="half_open") == 1
    assert proxy.metric("sidecar_circuit_breaker_transitions_total", route="main", to="closed") == 1


async def test_failed_probe_reopens_it(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 2, reset_timeout: 100ms}"))
    await trip(client, proxy, 2)
    await asyncio.sleep(0.15)
    assert (await get(client, proxy.url + "/x"))[:2] == (503, "sick")  # the probe's own answer
    status, _, headers = await get(client, proxy.url + "/x")
    assert status == 503 and headers["x-sidecar-error"] == "circuit_open"
    assert len(upstream.hits) == 3
    assert proxy.metric("sidecar_circuit_breaker_transitions_total", route="main", to="open") == 2


async def test_success_threshold_needs_that_many_probes(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick, sick, ok)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 2, reset_timeout: 100ms, "
                                                         "success_threshold: 2}"))
    await trip(client, proxy, 2)
    await asyncio.sleep(0.15)
    assert (await get(client, proxy.url + "/x"))[0] == 200
    assert state(proxy, "half_open") == 1
    assert (await get(client, proxy.url + "/x"))[0] == 200
    assert state(proxy, "closed") == 1


async def test_cancelled_probe_counts_neither_way(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    probe_arrived = asyncio.Event()

    async def hang(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        probe_arrived.set()
        await asyncio.sleep(5)
        return web.Response(text="too late")

    upstream.on("/x", sick, sick, hang, ok)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 2, reset_timeout: 100ms}"))
    await trip(client, proxy, 2)
    await asyncio.sleep(0.15)
    caller = asyncio.create_task(get(client, proxy.url + "/x"))
    async with asyncio.timeout(5):
        await probe_arrived.wait()
    caller.cancel()  # the caller hangs up while the probe is in flight
    await asyncio.gather(caller, return_exceptions=True)
    await wait_until(lambda: proxy.metric("sidecar_in_flight_requests", route="main") == 0)
    assert state(proxy, "half_open") == 1  # not closed by a "success", not re-opened by a "failure"
    assert proxy.metric("sidecar_circuit_breaker_transitions_total", route="main", to="open") == 1
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="499") == 1
    # The gate is free again: the next request is the probe, and it closes the breaker.
    assert (await get(client, proxy.url + "/x"))[:2] == (200, "ok")
    assert state(proxy, "closed") == 1


async def test_failure_rate_trips_on_a_mixed_sequence_but_not_below_min_requests(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", *([sick, ok] * 10))
    proxy = await sidecar_factory(breaker_yaml(
        upstream, "{failure_threshold: 100, failure_rate: {threshold: 0.5, window: 10s, min_requests: 10}}"))
    for _ in range(9):  # 5 failures in 9: above the threshold, below min_requests
        await get(client, proxy.url + "/x")
    assert state(proxy, "closed") == 1
    assert (await get(client, proxy.url + "/x"))[0] == 200  # the 10th attempt: 5 of 10 failed
    assert state(proxy, "open") == 1
    status, _, headers = await get(client, proxy.url + "/x")
    assert status == 503 and headers["x-sidecar-error"] == "circuit_open"
    assert len(upstream.hits) == 10


async def test_failure_rate_below_threshold_keeps_it_closed(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", *([sick, ok, ok] * 10))
    proxy = await sidecar_factory(breaker_yaml(
        upstream, "{failure_threshold: 100, failure_rate: {threshold: 0.5, window: 10s, min_requests: 10}}"))
    for _ in range(30):
        await get(client, proxy.url + "/x")
    assert state(proxy, "closed") == 1 and len(upstream.hits) == 30


async def test_fallback_is_served_while_open(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{failure_threshold: 1, reset_timeout: 5s}", """
        fallback: {status: 200, body: '{"items": []}', headers: {Content-Type: application/json, X-Degraded: "1"}}
    """))
    await trip(client, proxy, 1)
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
        assert await response.text() == '{"items": []}'
        assert response.headers["X-Degraded"] == "1"
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["x-sidecar-error"] == "circuit_open"
        assert response.headers["Retry-After"] == "5"
    assert len(upstream.hits) == 1


async def test_retries_never_retry_circuit_open_and_the_tripping_response_is_delivered(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        retries: {attempts: 5, backoff: {base: 1ms, max: 1ms}}
        circuit_breaker: {failure_threshold: 2, reset_timeout: 10s}
    """))
    async with client.get(proxy.url + "/x") as response:
        # attempt 1 fails, attempt 2 fails and trips; the retry meets the open breaker:
        # the caller gets attempt 2's real answer.
        assert response.status == 503 and await response.text() == "sick"
        assert response.headers["x-sidecar-attempts"] == "2"
    assert len(upstream.hits) == 2
    async with client.get(proxy.url + "/x") as response:
        assert response.headers["x-sidecar-error"] == "circuit_open"
    assert len(upstream.hits) == 2


async def test_connect_failures_and_timeouts_count(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{unused_tcp_port}", """
        retries: {attempts: 1}
        circuit_breaker: {failure_threshold: 2}
    """))
    for _ in range(2):
        async with client.get(proxy.url + "/x") as response:
            assert response.headers["x-sidecar-error"] == "connect_failure"
    async with client.get(proxy.url + "/x") as response:
        assert response.headers["x-sidecar-error"] == "circuit_open"


async def test_disabled_breaker_never_opens(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", sick)
    proxy = await sidecar_factory(breaker_yaml(upstream, "{enabled: false, failure_threshold: 1}"))
    for _ in range(5):
        assert (await get(client, proxy.url + "/x"))[0] == 503
    assert len(upstream.hits) == 5
