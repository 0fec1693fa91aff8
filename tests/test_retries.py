"""Retries: safe by default, bounded by attempts, deadline and budget, and visible in headers and metrics."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Hit, SidecarFactory, Upstream, answering, route_yaml


async def fail_503(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    hit.body = await request.content.read()
    return web.Response(status=503, text="sick")


async def drop_after_reading(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    hit.body = await request.content.read()  # the upstream has the whole request, then the line drops
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


async def slow(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    hit.body = await request.content.read()
    await asyncio.sleep(2)
    return web.Response(text="late")


async def echo_body(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    hit.body = await request.content.read()
    return web.Response(body=hit.body)


async def test_get_is_retried_on_503_and_the_retry_is_visible(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", fail_503, echo_body)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
        assert response.headers["x-sidecar-attempts"] == "2"
        assert response.headers["x-sidecar-upstream-ms"].isdigit()
    assert len(upstream.hits_for("/x")) == 2
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="failure_status") == 1
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="success") == 1
    assert proxy.metric("sidecar_retries_total", route="main", reason="503") == 1
    assert proxy.metric("sidecar_upstream_attempt_duration_seconds_count", route="main") == 2
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="200") == 1


async def test_get_is_retried_on_reset_and_gives_up_after_attempts(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", drop_after_reading)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 502
        assert response.headers["x-sidecar-attempts"] == "3"
        body = await response.json()
    assert body["error"] == "upstream_reset" and body["attempts"] == 3
    assert len(upstream.hits_for("/x")) == 3
    assert proxy.metric("sidecar_retries_total", route="main", reason="reset") == 2
    assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="attempts_exhausted") == 1
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="reset") == 3


async def test_last_attempts_upstream_response_is_returned_untouched(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", fail_503)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 2, backoff: {base: 1ms, max: 1ms}}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 503
        assert await response.text() == "sick"
        assert "x-sidecar-error" not in response.headers
        assert response.headers["x-sidecar-attempts"] == "2"


async def test_timeout_is_retried_only_when_listed(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    for on, expected_hits in (("[connect-failure, reset, 503]", 1), ("[timeout]", 2)):
        upstream = await upstream_factory("slow")
        upstream.on("/x", slow)
        proxy = await sidecar_factory(route_yaml(upstream.url, f"""
            timeouts: {{per_try: 100ms, total: 5s}}
            retries: {{attempts: 2, on: {on}, backoff: {{base: 1ms, max: 1ms}}}}
        """))
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 504
        assert len(upstream.hits) == expected_hits, on


@pytest.mark.parametrize("behaviour", [fail_503, drop_after_reading, slow], ids=["503", "reset", "per-try-timeout"])
async def test_post_reaches_the_upstream_at_most_once(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, behaviour
) -> None:
    upstream.on("/pay", behaviour)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        timeouts: {per_try: 100ms, total: 5s}
        retries: {attempts: 5, on: [connect-failure, reset, timeout, 503], backoff: {base: 1ms, max: 1ms}}
    """))
    async with client.post(proxy.url + "/pay", data=b"charge 10 EUR") as response:
        assert response.status in (502, 503, 504)
        assert response.headers["x-sidecar-attempts"] == "1"
    assert [hit.body for hit in upstream.hits] == [b"charge 10 EUR"]
    assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="non_idempotent") == 1
    assert proxy.metric("sidecar_retries_total", route="main", reason="503") == 0


async def test_patch_is_not_retried_either(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/p", fail_503)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}"))
    async with client.patch(proxy.url + "/p", data=b"x") as response:
        assert response.status == 503
    assert len(upstream.hits) == 1


@pytest.mark.parametrize(("extra", "headers"), [
    ("", {"Idempotency-Key": "order-42"}),
    ("non_idempotent: true", {}),
], ids=["idempotency-key", "route-opt-in"])
async def test_post_is_retried_with_idempotency_key_or_opt_in(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, extra: str,
    headers: dict[str, str],
) -> None:
    upstream.on("/pay", fail_503, echo_body)
    proxy = await sidecar_factory(route_yaml(upstream.url, f"""
        retries: {{attempts: 3, backoff: {{base: 1ms, max: 1ms}}, {extra}}}
    """.replace(", }", "}")))
    async with client.post(proxy.url + "/pay", data=b"charge", headers=headers) as response:
        assert response.status == 200
        assert await response.read() == b"charge"
    assert [hit.body for hit in upstream.hits] == [b"charge", b"charge"]


async def test_post_is_retried_on_a_refused_connect_and_goes_to_the_other_endpoint(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    upstream.on("/pay", echo_body)
    proxy = await sidecar_factory(f"""
        upstreams:
          pair: {{endpoints: ["http://127.0.0.1:{unused_tcp_port}", "{upstream.url}"]}}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: pair
            retries: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
    """)
    async with client.post(proxy.url + "/pay", data=b"charge once") as response:
        assert response.status == 200
        assert response.headers["x-sidecar-attempts"] == "2"
    assert [hit.body for hit in upstream.hits] == [b"charge once"]
    assert proxy.metric("sidecar_retries_total", route="main", reason="connect-failure") == 1
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="connect_failure") == 1


async def test_streamed_post_is_retried_on_refused_connect_because_no_byte_left(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    upstream.on("/up", echo_body)
    payload = b"b" * (200 * 1024)  # above max_body: streamed, not buffered
    proxy = await sidecar_factory(f"""
        upstreams:
          pair: {{endpoints: ["http://127.0.0.1:{unused_tcp_port}", "{upstream.url}"]}}
        routes:
          - {{name: main, match: {{path_prefix: /}}, upstream: pair, retries: {{backoff: {{base: 1ms, max: 1ms}}}}}}
    """)
    async with client.post(proxy.url + "/up", data=payload) as response:
        assert response.status == 200
        assert await response.read() == payload
    assert len(upstream.hits) == 1


async def test_body_above_max_body_is_sent_once_and_not_retried(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/put", fail_503)
    payload = bytes(range(256)) * 400  # 100 KiB, above the 64 KiB default
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}"))
    async with client.put(proxy.url + "/put", data=payload) as response:
        assert response.status == 503
    assert [hit.body for hit in upstream.hits] == [payload]
    assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="body_too_large") == 1


async def test_small_body_is_replayed_intact(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/put", fail_503, fail_503, echo_body)
    payload = bytes(range(256)) * 100  # 25 KiB
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}"))
    async with client.put(proxy.url + "/put", data=payload) as response:
        assert response.status == 200
        assert await response.read() == payload
    assert [hit.body for hit in upstream.hits] == [payload] * 3
    assert all(hit.headers["Content-Length"] == str(len(payload)) for hit in upstream.hits)


async def test_backoff_draws_each_wait_within_its_jitter_bounds(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws: list[tuple[float, float]] = []

    def lowest(low: float, high: float) -> float:
        draws.append((low, high))
        return low

    monkeypatch.setattr(random, "uniform", lowest)  # the layer takes random.uniform when it is built
    upstream.on("/x", answering(503))
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 4, backoff: {base: 80ms, max: 120ms}}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 503
    assert len(upstream.hits) == 4
    # Retry n waits in [0, min(max, base * 2^n)): 80ms, then 120ms (capped) twice.
    assert draws == [(0.0, 0.08), (0.0, 0.12), (0.0, 0.12)]


async def test_retry_after_is_honoured_when_short(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    seen: list[float] = []

    async def busy(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        seen.append(loop.time())
        return web.Response(status=429, headers={"Retry-After": "1"})

    async def ok(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        seen.append(loop.time())
        return web.Response(text="ok")

    upstream.on("/x", busy, ok)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        retries: {attempts: 2, on: [429], backoff: {base: 1ms, max: 1ms}, retry_after_max: 2s}
    """))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
    assert seen[1] - seen[0] >= 0.95  # the upstream's 1s, not the 1ms backoff


@pytest.mark.parametrize("retry_after", ["5", "http-date"])
async def test_retry_after_longer_than_the_cap_returns_the_response_as_is(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, retry_after: str
) -> None:
    value = email.utils.formatdate(time.time() + 30, usegmt=True) if retry_after == "http-date" else retry_after

    async def unavailable(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=503, text="come back later", headers={"Retry-After": value})

    upstream.on("/x", unavailable)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3, retry_after_max: 1s}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == value
        assert await response.text() == "come back later"
    assert len(upstream.hits) == 1
    assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="retry_after_too_long") == 1


async def test_total_deadline_holds_across_retries(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", fail_503)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        timeouts: {total: 300ms}
        retries: {attempts: 50, backoff: {base: 100ms, max: 100ms}}
        circuit_breaker: {enabled: false}
    """))
    async with client.get(proxy.url + "/x") as response:
        status = response.status
        attempts = int(response.headers["x-sidecar-attempts"])
        error = response.headers.get("x-sidecar-error")
    # Each backoff is under 100ms, so the 300ms deadline cannot hold 50 attempts. Either a retry
    # was skipped because its backoff would pass the deadline (the last 503 goes back), or the
    # last attempt got only the time left and ran out of it (timeout).
    assert 1 < attempts < 50
    if status == 503:
        assert error is None
        assert len(upstream.hits) == attempts
        assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="deadline") == 1
    else:
        assert (status, error) == (504, "timeout")
        assert attempts - 1 <= len(upstream.hits) <= attempts  # the last one may not have arrived


async def test_caller_headers_tighten_but_never_loosen(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", fail_503)
    upstream.on("/slow", slow)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        timeouts: {per_try: 5s, total: 300ms}
        retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}}
        circuit_breaker: {enabled: false}
    """))
    async with client.get(proxy.url + "/x", headers={"x-sidecar-max-attempts": "1"}) as response:
        assert response.headers["x-sidecar-attempts"] == "1"
    async with client.get(proxy.url + "/x", headers={"x-sidecar-max-attempts": "10"}) as response:
        assert response.headers["x-sidecar-attempts"] == "3"
    async with client.get(proxy.url + "/slow", headers={"x-sidecar-timeout-ms": "50"}) as response:
        assert response.status == 504
        assert "within 0.05s" in (await response.json())["message"]
    async with client.get(proxy.url + "/slow", headers={"x-sidecar-timeout-ms": "600000"}) as response:
        assert response.status == 504
        assert "within 0.3s" in (await response.json())["message"]
    assert len(upstream.hits_for("/x")) == 4
    for hit in upstream.hits:
        assert not any(name.lower().startswith("x-sidecar-") for name in hit.headers)


@pytest.mark.parametrize(("name", "value"), [("x-sidecar-max-attempts", "two"), ("x-sidecar-timeout-ms", "-5"),
                                             ("x-sidecar-max-attempts", "0")])
async def test_malformed_caller_header_is_400_and_not_forwarded(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, name: str, value: str
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/x", headers={name: value}) as response:
        assert response.status == 400
        assert response.headers["x-sidecar-error"] == "bad_request"
        assert name in (await response.json())["message"]
    assert upstream.hits == []


async def test_budget_caps_retries_when_every_request_fails(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/x", fail_503)
    proxy = await sidecar_factory(route_yaml(upstream.url, """
        retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}, budget: {ratio: 0.2, min_per_second: 1}}
        circuit_breaker: {enabled: false}
    """))
    for _ in range(200):
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 503
    retries = proxy.metric("sidecar_retries_total", route="main", reason="503")
    # 200 requests * 0.2 + 1/s * 10s window; without the budget there would be 400 retries.
    assert retries <= 200 * 0.2 + 1 * 10
    assert retries >= 40  # the budget does allow what it promises
    assert len(upstream.hits) == 200 + retries
    assert proxy.metric("sidecar_retries_skipped_total", route="main", reason="budget") > 0


async def test_retry_goes_to_a_different_endpoint_even_when_round_robin_points_back(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    sick = await upstream_factory("sick")
    healthy = await upstream_factory("healthy")

    async def slow_503(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.Response(status=503)

    sick.on("/x", slow_503)
    proxy = await sidecar_factory(f"""
        upstreams:
          pair: {{endpoints: ["{sick.url}", "{healthy.url}"]}}
        routes:
          - {{name: main, match: {{path_prefix: /}}, upstream: pair, retries: {{backoff: {{base: 1ms, max: 1ms}}}}}}
    """)

    async def call() -> int:
        async with client.get(proxy.url + "/x") as response:
            return response.status

    # Two at once: one starts on `sick`, one on `healthy`. When the first fails, round robin
    # points at `sick` again; the retry must skip the endpoint that just failed.
    assert await asyncio.gather(call(), call()) == [200, 200]
    assert len(sick.hits) == 1
    assert len(healthy.hits) == 2


async def test_nothing_is_retried_once_the_response_has_started(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def die_mid_body(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.on("/x", die_mid_body)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 3}"))
    async with client.get(proxy.url + "/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(upstream.hits) == 1
