"""The cache wired into the running sidecar: x-sidecar-cache on the sidecar's own answers, the
metrics, reloads, and the admin API. Real sidecars from YAML, real upstreams on loopback."""

from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.cache.layer import RouteCache
from sidecar.config import parse_config
from tests.conftest import Hit, RunningSidecar, SidecarFactory, Upstream, answering, with_test_listeners
from tests.processes import free_port
from tests.test_cache_layer import BODY, Clock, answer, get

FRESH = answer(Cache_Control="max-age=60")


def two_routes(upstream_url: str, cache: str = "{}", plain_url: str | None = None) -> str:
    """`main` cached (with `cache`), `plain` without a cache; no retries, no breaker."""
    return f"""
        upstreams:
          up: {{endpoints: ["{upstream_url}"]}}
          other: {{endpoints: ["{plain_url or upstream_url}"]}}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: up
            retries: {{attempts: 1}}
            circuit_breaker: {{enabled: false}}
            cache: {cache}
          - name: plain
            match: {{path_prefix: /plain/}}
            upstream: other
            retries: {{attempts: 1}}
            circuit_breaker: {{enabled: false}}
    """


def cache_of(proxy: RunningSidecar, route: str = "main") -> RouteCache | None:
    return proxy.sidecar.route_states[route].cache


async def reload(proxy: RunningSidecar, text: str) -> None:
    await proxy.sidecar.reload(parse_config(with_test_listeners(text), {}))


# --- x-sidecar-cache on the sidecar's own answers ----------------------------------------------


async def test_a_sidecar_made_502_on_a_cached_route_says_miss_and_a_plain_route_says_nothing(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await sidecar_factory(two_routes(dead))
    status, _, headers = await get(client, proxy, "/a")
    assert (status, headers["x-sidecar-error"], headers["x-sidecar-cache"]) == (502, "connect_failure", "MISS")
    status, _, headers = await get(client, proxy, "/a", method="POST")
    assert (status, headers["x-sidecar-error"], headers["x-sidecar-cache"]) == (502, "connect_failure", "BYPASS")
    status, _, headers = await get(client, proxy, "/plain/a")
    assert (status, headers["x-sidecar-error"]) == (502, "connect_failure")
    assert "x-sidecar-cache" not in headers


async def test_a_request_refused_before_the_cache_says_bypass(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url))
    status, _, headers = await get(client, proxy, "/a", x_sidecar_timeout_ms="soon")
    assert (status, headers["x-sidecar-error"], headers["x-sidecar-cache"]) == (400, "bad_request", "BYPASS")
    assert proxy.metric("sidecar_cache_requests_total", route="main", result="bypass") == 1
    assert upstream.hits_for("/a") == []


# --- Metrics --------------------------------------------------------------------------------------


async def test_metrics_count_each_answer_by_its_label_and_follow_the_stored_bytes(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    proxy = await sidecar_factory(two_routes(upstream.url), wall_clock=clock)
    upstream.on("/a", answer(Cache_Control="max-age=10"), answering(503))
    labels = []
    for advance in (0, 2, 2, 30):  # MISS, HIT, HIT, then stale: the 503 is covered by the entry
        clock.advance(advance)
        labels.append((await get(client, proxy, "/a"))[2]["x-sidecar-cache"])
    assert labels == ["MISS", "HIT", "HIT", "STALE"]
    results = {result: proxy.metric("sidecar_cache_requests_total", route="main", result=result)
               for result in ("miss", "hit", "stale", "bypass", "revalidated", "coalesced")}
    assert results == {"miss": 1, "hit": 2, "stale": 1, "bypass": 0, "revalidated": 0, "coalesced": 0}
    cache = cache_of(proxy)
    assert cache is not None and cache.store.bytes > len(BODY)
    assert proxy.metric("sidecar_cache_bytes", route="main") == cache.store.bytes
    assert proxy.metric("sidecar_cache_evictions_total", route="main") == 0
    assert proxy.registry.get_sample_value("sidecar_cache_bytes", {"route": "plain"}) is None


async def test_evictions_are_counted_and_the_bytes_stay_within_max_bytes(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url, "{max_bytes: 8KiB}"))
    for i in range(10):
        upstream.on(f"/item/{i}", answer(b"x" * 2000, Cache_Control="max-age=60"))
        assert (await get(client, proxy, f"/item/{i}"))[0] == 200
        assert proxy.metric("sidecar_cache_bytes", route="main") <= 8 * 1024
    cache = cache_of(proxy)
    assert cache is not None and cache.store.evictions > 0
    assert proxy.metric("sidecar_cache_evictions_total", route="main") == cache.store.evictions
    assert proxy.metric("sidecar_cache_requests_total", route="main", result="miss") == 10


# --- Reloads --------------------------------------------------------------------------------------


async def test_a_reload_that_leaves_the_route_alone_keeps_its_entries(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url))
    upstream.on("/a", FRESH)
    await get(client, proxy, "/a")
    before = cache_of(proxy)
    await reload(proxy, two_routes(upstream.url).replace("/plain/", "/other/"))  # another route changed
    assert cache_of(proxy) is before
    status, body, headers = await get(client, proxy, "/a")
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "HIT")
    assert len(upstream.hits_for("/a")) == 1


async def test_a_reload_that_changes_the_cache_starts_afresh_and_frees_the_old_entries(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url))
    upstream.on("/a", FRESH)
    await get(client, proxy, "/a")
    old = cache_of(proxy)
    assert old is not None and len(old.store) == 1
    await reload(proxy, two_routes(upstream.url, "{max_bytes: 1MiB}"))
    new = cache_of(proxy)
    assert new is not None and new is not old and new.store.max_bytes == 1024**2
    assert len(old.store) == 0  # closed: nothing keeps the replaced cache's entries alive
    assert proxy.metric("sidecar_cache_bytes", route="main") == 0
    _, _, headers = await get(client, proxy, "/a")
    assert headers["x-sidecar-cache"] == "MISS"
    assert proxy.metric("sidecar_cache_bytes", route="main") == new.store.bytes > 0


async def test_a_reload_that_removes_the_cache_takes_it_off_the_route(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url))
    upstream.on("/a", FRESH)
    await get(client, proxy, "/a")
    old = cache_of(proxy)
    assert old is not None
    await reload(proxy, two_routes(upstream.url).replace("cache: {}", ""))
    assert cache_of(proxy) is None and len(old.store) == 0
    assert proxy.metric("sidecar_cache_bytes", route="main") == 0
    status, _, headers = await get(client, proxy, "/a")
    assert status == 200 and "x-sidecar-cache" not in headers
    assert len(upstream.hits_for("/a")) == 2


@pytest.mark.parametrize("stop", ["stop", "drain_and_stop"])
async def test_stopping_lets_the_entries_go(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, stop: str
) -> None:
    proxy = await sidecar_factory(textwrap.dedent(two_routes(upstream.url)) + "shutdown: {drain_delay: 0s}\n")
    upstream.on("/a", FRESH)
    await get(client, proxy, "/a")
    cache = cache_of(proxy)
    assert cache is not None and len(cache.store) == 1
    await getattr(proxy.sidecar, stop)()
    assert len(cache.store) == 0


# --- Admin API ----------------------------------------------------------------------------------


async def admin(client: aiohttp.ClientSession, proxy: RunningSidecar, method: str, path: str,
                **headers: str) -> tuple[int, dict[str, Any]]:
    async with client.request(method, proxy.admin + path, headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return response.status, await response.json()


async def test_a_purge_makes_the_next_get_a_miss_that_reaches_the_upstream(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url))
    for path in ("/items/1", "/items/2", "/other"):
        upstream.on(path, FRESH)
        assert (await get(client, proxy, path))[2]["x-sidecar-cache"] == "MISS"
    assert await admin(client, proxy, "DELETE", "/api/v1/cache?route=main&prefix=/items/") == (
        200, {"prefix": "/items/", "purged": {"main": 2}})
    assert (await get(client, proxy, "/items/1"))[2]["x-sidecar-cache"] == "MISS"
    assert (await get(client, proxy, "/other"))[2]["x-sidecar-cache"] == "HIT"  # outside the prefix
    assert [len(upstream.hits_for(path)) for path in ("/items/1", "/items/2", "/other")] == [2, 1, 1]
    assert await admin(client, proxy, "DELETE", "/api/v1/cache") == (200, {"prefix": "/", "purged": {"main": 2}})
    assert (await get(client, proxy, "/other"))[2]["x-sidecar-cache"] == "MISS"
    assert len(upstream.hits_for("/other")) == 2
    cache = cache_of(proxy)
    assert cache is not None and len(cache.store) == 1
    assert proxy.metric("sidecar_cache_bytes", route="main") == cache.store.bytes > 0


async def test_a_purge_needs_the_token_and_names_what_it_cannot_purge(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory("admin: {listen: 127.0.0.1:0, token: s3cret}\n" + textwrap.dedent(
        two_routes(upstream.url)))
    upstream.on("/a", FRESH)
    await get(client, proxy, "/a")
    status, body = await admin(client, proxy, "DELETE", "/api/v1/cache")
    assert (status, body["error"]) == (401, "unauthorized")
    assert (await get(client, proxy, "/a"))[2]["x-sidecar-cache"] == "HIT"  # nothing was purged
    token = {"Authorization": "Bearer s3cret"}
    for query, expected in [
        ("?route=nowhere", (404, "unknown_route")),
        ("?route=plain", (409, "cache_disabled")),
        ("?route=main&prefix=items", (400, "bad_request")),
    ]:
        status, body = await admin(client, proxy, "DELETE", "/api/v1/cache" + query, **token)
        assert (status, body["error"]) == expected, query
    assert (await get(client, proxy, "/a"))[2]["x-sidecar-cache"] == "HIT"
    assert await admin(client, proxy, "DELETE", "/api/v1/cache?route=main", **token) == (
        200, {"prefix": "/", "purged": {"main": 1}})


async def test_routes_show_each_cache_and_its_figures(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(two_routes(upstream.url, "{max_bytes: 1MiB}"))
    upstream.on("/a", FRESH)
    for _ in range(3):
        await get(client, proxy, "/a")
    status, body = await admin(client, proxy, "GET", "/api/v1/routes")
    assert status == 200
    routes = {route["name"]: route for route in body["routes"]}
    assert routes["plain"]["cache"] is None and routes["plain"]["cache_stats"] is None
    assert routes["main"]["cache"]["max_bytes"] == "1MiB"
    stats = routes["main"]["cache_stats"]
    cache = cache_of(proxy)
    assert cache is not None
    assert stats == {"entries": 1, "bytes": cache.store.bytes, "max_bytes": 1024**2, "evictions": 0,
                     "results": {"miss": 1, "hit": 2}}


# --- WebSockets -------------------------------------------------------------------------------------


async def test_a_websocket_handshake_on_a_cached_route_is_tunnelled_never_answered_from_an_entry(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """A plain GET stored an entry for /ws; a handshake for the same target must still reach the
    upstream (and get its 101), not the stored 200."""

    async def page_or_socket(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})
        ws = web.WebSocketResponse()
        await ws.prepare(request)  # type: ignore[arg-type]
        async for message in ws:
            await ws.send_str("echo " + message.data)
        return ws

    upstream.on("/ws", page_or_socket)
    proxy = await sidecar_factory(two_routes(upstream.url))
    assert (await get(client, proxy, "/ws"))[2]["x-sidecar-cache"] == "MISS"
    assert (await get(client, proxy, "/ws"))[2]["x-sidecar-cache"] == "HIT"
    async with asyncio.timeout(5), client.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo hello"
    assert len(upstream.hits_for("/ws")) == 2
    assert proxy.metric("sidecar_cache_requests_total", route="main", result="bypass") == 1
