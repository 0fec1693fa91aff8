"""The cache in the real proxy path: a real sidecar whose route has `cache:` in its config, a real
upstream on loopback counting its hits. Freshness runs on a fake wall clock (the sidecar's
`wall_clock`), so nothing sleeps to expire.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.cache.layer import RouteCache
from tests.conftest import Gate, Hit, RunningSidecar, SidecarFactory, Upstream, route_yaml, wait_until

BODY = b"the stored answer " * 20


class Clock:
    """The cache's wall clock, moved by hand; starts at the real time so upstream Date headers agree."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# No retries, no breaker: each test sees exactly the upstream requests it causes.
NO_RETRIES = "retries: {attempts: 1}\ncircuit_breaker: {enabled: false}"


def cached_yaml(upstream_url: str, policies: str = NO_RETRIES, **settings: str) -> str:
    """One route `main` with `cache:` (the given settings, the rest defaulted)."""
    section = ", ".join(f"{name}: {value}" for name, value in settings.items())
    return route_yaml(upstream_url, f"{policies}\ncache: {{{section}}}")


def cache_of(proxy: RunningSidecar) -> RouteCache:
    """Route `main`'s cache as the sidecar built it, to read its store and coalescer."""
    cache = proxy.sidecar.route_states["main"].cache
    assert cache is not None
    return cache


def answer(body: bytes = BODY, status: int = 200, clock: Clock | None = None, **headers: str) -> Any:
    """An upstream behaviour; with `clock`, its Date follows the cache's fake clock (as a real
    upstream's Date follows the real one)."""

    async def respond(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        fields = {k.replace("_", "-"): v for k, v in headers.items()}
        if clock is not None:
            fields["Date"] = formatdate(clock.now, usegmt=True)
        return web.Response(status=status, body=body, headers=fields)

    return respond


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def proxy(sidecar_factory: SidecarFactory, upstream: Upstream, clock: Clock) -> RunningSidecar:
    return await sidecar_factory(cached_yaml(upstream.url), wall_clock=clock)


@pytest.fixture
def cache(proxy: RunningSidecar) -> RouteCache:
    return cache_of(proxy)


async def get(client: aiohttp.ClientSession, proxy: RunningSidecar, path: str = "/a",
              method: str = "GET", **headers: str) -> tuple[int, bytes, Any]:
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    async with client.request(method, proxy.url + path, headers=sent) as response:
        return response.status, await response.read(), response.headers


def held(gate: Gate, body: bytes = BODY, status: int = 200, **headers: str) -> Any:
    """An upstream behaviour that waits at `gate` before it answers."""

    async def respond(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        await gate(request, hit)
        return web.Response(status=status, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})

    return respond


async def herd(client: aiohttp.ClientSession, proxy: RunningSidecar, gate: Gate, count: int) -> list[Any]:
    """`count` concurrent GETs of /a, released once the first is at the upstream and the rest wait for it."""
    callers = [asyncio.create_task(get(client, proxy)) for _ in range(count)]
    await gate.until_waiting(1)
    await wait_until(lambda: cache_of(proxy).coalescer.waiting == count - 1)
    gate.release.set()
    return list(await asyncio.gather(*callers))


async def test_a_fresh_hit_does_not_reach_the_upstream(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=60", ETag='"v1"'))
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "MISS")
    clock.advance(30)
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "HIT")
    assert 30 <= int(headers["Age"]) <= 31  # the upstream's Date has whole seconds
    assert headers["ETag"] == '"v1"' and headers["Content-Length"] == str(len(BODY))
    assert headers["x-sidecar-attempts"] == "0"
    assert len(upstream.hits_for("/a")) == 1


@pytest.mark.parametrize(("response_headers", "request_headers"), [
    ({"Cache_Control": "private, max-age=60"}, {}),
    ({"Cache_Control": "no-store, max-age=60"}, {}),
    ({"Cache_Control": "max-age=60", "Set_Cookie": "session=1"}, {}),
    ({"Cache_Control": "max-age=60"}, {"Authorization": "Bearer t"}),
    ({"Cache_Control": "max-age=60", "Vary": "*"}, {}),
])
async def test_what_must_not_be_stored_is_not(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock,
    response_headers: dict[str, str], request_headers: dict[str, str],
) -> None:
    cache = cache_of(proxy)
    upstream.on("/a", answer(**response_headers))
    for _ in range(2):
        status, body, headers = await get(client, proxy, **request_headers)
        assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "MISS")
    assert len(upstream.hits_for("/a")) == 2
    assert len(cache.store) == 0


async def test_authorization_with_public_is_stored(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="public, max-age=60"))
    await get(client, proxy, Authorization="Bearer t")
    status, _, headers = await get(client, proxy, Authorization="Bearer t")
    assert (status, headers["x-sidecar-cache"]) == (200, "HIT")
    assert len(upstream.hits_for("/a")) == 1


async def test_vary_accept_encoding_keeps_two_variants_apart(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:

    async def negotiate(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        headers = {"Cache-Control": "max-age=60", "Vary": "Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=b"GZIPPED" if gzip else b"plain", headers=headers)

    upstream.on("/a", negotiate)
    assert (await get(client, proxy, Accept_Encoding="gzip"))[1] == b"GZIPPED"
    assert (await get(client, proxy))[1] == b"plain"
    status, body, headers = await get(client, proxy, Accept_Encoding="gzip")
    assert (body, headers["x-sidecar-cache"], headers["Content-Encoding"]) == (b"GZIPPED", "HIT", "gzip")
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (200, b"plain", "HIT")
    assert "Content-Encoding" not in headers
    assert len(upstream.hits_for("/a")) == 2


async def test_stale_if_error_serves_the_stored_body_when_the_upstream_is_killed(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, clock: Clock
) -> None:
    doomed = Upstream("doomed")
    runner = web.ServerRunner(web.Server(doomed.handle), shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = await sidecar_factory(cached_yaml(f"http://127.0.0.1:{port}", stale_if_error="5m"), wall_clock=clock)
        doomed.on("/a", answer(Cache_Control="max-age=10", X_Version="1"))
        _, stored_body, _ = await get(client, proxy)
    finally:
        await runner.cleanup()  # killed: its port now refuses connections
    clock.advance(10 + 200)  # stale for 200 s, within the 5 min window
    status, body, headers = await get(client, proxy)
    assert (status, body) == (200, stored_body)
    assert headers["x-sidecar-cache"] == "STALE"
    assert headers["x-sidecar-stale-reason"] == "connect_failure"
    assert headers["X-Version"] == "1"
    assert 210 <= int(headers["Age"]) <= 211
    clock.advance(101)  # past the window: the error, as without a cache
    status, body, headers = await get(client, proxy)
    assert status == 502
    assert headers["x-sidecar-error"] == "connect_failure"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_stale_if_error_covers_failure_statuses(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock, status: int
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=1"), answer(b"upstream error page", status=status))
    await get(client, proxy)
    clock.advance(5)
    got, body, headers = await get(client, proxy)
    assert (got, body, headers["x-sidecar-cache"], headers["x-sidecar-stale-reason"]) == (
        200, BODY, "STALE", f"status_{status}")


async def test_a_failure_status_without_a_stored_entry_passes_through(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(b"down", status=503))
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (503, b"down", "MISS")


async def test_revalidation_with_304_refreshes_without_a_body_transfer(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    cache = cache_of(proxy)

    async def conditional(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        date = formatdate(clock.now, usegmt=True)
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={
                "ETag": '"v1"', "Cache-Control": "max-age=60", "X-Fresh": "yes", "Date": date})
        return web.Response(body=BODY, headers={"ETag": '"v1"', "Cache-Control": "max-age=10", "Date": date})

    upstream.on("/a", conditional)
    await get(client, proxy)
    clock.advance(20)
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "REVALIDATED")
    assert headers["X-Fresh"] == "yes"  # the 304's headers updated the entry
    hits = upstream.hits_for("/a")
    assert len(hits) == 2 and hits[1].headers["If-None-Match"] == '"v1"'
    clock.advance(50)  # the 304 made it fresh for 60 s more
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "HIT")
    assert len(upstream.hits_for("/a")) == 2
    assert len(cache.store) == 1


async def test_a_callers_matching_conditional_gets_304_from_the_entry(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=60", ETag='"v1"'))
    # On a miss the caller's conditional is not forwarded: the upstream sends the whole
    # (storable) answer, and the cache answers the conditional itself.
    status, body, headers = await get(client, proxy, If_None_Match='"v1"')
    assert (status, body, headers["x-sidecar-cache"], headers["ETag"]) == (304, b"", "MISS", '"v1"')
    assert "If-None-Match" not in upstream.hits_for("/a")[0].headers
    status, body, headers = await get(client, proxy, If_None_Match='"v1"')
    assert (status, body, headers["x-sidecar-cache"]) == (304, b"", "HIT")
    status, body, headers = await get(client, proxy, If_None_Match='"v0"')
    assert (status, body, headers["x-sidecar-cache"]) == (200, BODY, "HIT")
    assert len(upstream.hits_for("/a")) == 1


async def test_hundred_concurrent_gets_on_a_miss_make_one_upstream_request(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    gate = Gate()
    upstream.on("/a", held(gate, Cache_Control="max-age=60"))
    answers = await herd(client, proxy, gate, 100)
    assert {(status, body) for status, body, _ in answers} == {(200, BODY)}
    labels = sorted(headers["x-sidecar-cache"] for _, _, headers in answers)
    assert labels == ["COALESCED"] * 99 + ["MISS"]
    assert len(upstream.hits_for("/a")) == 1


async def test_not_storable_waiters_each_go_upstream(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    gate = Gate()
    upstream.on("/a", held(gate, Cache_Control="private"))
    answers = await herd(client, proxy, gate, 5)
    assert [(status, body) for status, body, _ in answers] == [(200, BODY)] * 5
    assert len(upstream.hits_for("/a")) == 5


async def test_eviction_keeps_the_byte_bound(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    proxy = await sidecar_factory(cached_yaml(upstream.url, max_bytes="20KiB", max_entry="4KiB"), wall_clock=clock)
    cache = cache_of(proxy)
    for i in range(40):
        upstream.on(f"/item/{i}", answer(b"%d" % i * 1000, Cache_Control="max-age=60"))
        status, _, headers = await get(client, proxy, f"/item/{i}")
        assert (status, headers["x-sidecar-cache"]) == (200, "MISS")
        assert cache.store.bytes <= 20 * 1024
    assert cache.store.evictions > 0
    assert 0 < len(cache.store) < 40
    # The most recent ones are still there.
    status, body, headers = await get(client, proxy, "/item/39")
    assert (body, headers["x-sidecar-cache"]) == (b"39" * 1000, "HIT")


async def test_a_response_over_max_entry_streams_through_uncached(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    cache = cache_of(proxy)  # max_entry 1 MiB
    big = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB
    upstream.on("/big", answer(big, Cache_Control="max-age=60"))
    for _ in range(2):
        status, body, headers = await get(client, proxy, "/big")
        assert (status, len(body), body == big, headers["x-sidecar-cache"]) == (200, len(big), True, "MISS")
    assert len(upstream.hits_for("/big")) == 2
    assert cache.store.bytes == 0


async def test_head_after_get_answers_from_the_entry(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=60", ETag='"v1"'))
    await get(client, proxy)
    status, body, headers = await get(client, proxy, method="HEAD")
    assert (status, body, headers["x-sidecar-cache"]) == (200, b"", "HIT")
    assert headers["Content-Length"] == str(len(BODY))
    assert len(upstream.hits_for("/a")) == 1


async def test_head_on_a_miss_goes_upstream_and_is_not_stored(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    cache = cache_of(proxy)
    upstream.on("/a", answer(Cache_Control="max-age=60"))
    status, _, headers = await get(client, proxy, method="HEAD")
    assert (status, headers["x-sidecar-cache"]) == (200, "MISS")
    assert len(cache.store) == 0
    status, body, headers = await get(client, proxy)
    assert (body, headers["x-sidecar-cache"]) == (BODY, "MISS")


async def test_an_unsafe_request_invalidates_the_entry(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=60"))
    await get(client, proxy)
    status, _, headers = await get(client, proxy, method="POST")
    assert (status, headers["x-sidecar-cache"]) == (200, "BYPASS")
    _, _, headers = await get(client, proxy)
    assert headers["x-sidecar-cache"] == "MISS"
    assert [hit.method for hit in upstream.hits_for("/a")] == ["GET", "POST", "GET"]


async def test_request_no_store_bypasses_and_no_cache_revalidates(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(Cache_Control="max-age=60", ETag='"v1"'))
    await get(client, proxy)
    _, _, headers = await get(client, proxy, Cache_Control="no-store")
    assert headers["x-sidecar-cache"] == "BYPASS"
    _, body, headers = await get(client, proxy, Cache_Control="no-cache")
    assert (body, headers["x-sidecar-cache"]) == (BODY, "MISS")  # the upstream answered 200, not 304
    hits = upstream.hits_for("/a")
    assert len(hits) == 3 and hits[2].headers["If-None-Match"] == '"v1"'


async def test_stale_while_revalidate_answers_at_once_and_refreshes_in_the_background(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    proxy = await sidecar_factory(cached_yaml(upstream.url, stale_while_revalidate="30s"), wall_clock=clock)
    cache = cache_of(proxy)
    upstream.on("/a", answer(b"v1", clock=clock, Cache_Control="max-age=10"),
                answer(b"v2", clock=clock, Cache_Control="max-age=10"))
    await get(client, proxy)
    clock.advance(15)
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"], headers["x-sidecar-stale-reason"]) == (
        200, b"v1", "STALE", "stale_while_revalidate")
    await wait_until(lambda: [entry.body for _, entry in cache.store.items()] == [b"v2"])
    _, body, headers = await get(client, proxy)
    assert (body, headers["x-sidecar-cache"]) == (b"v2", "HIT")
    assert len(upstream.hits_for("/a")) == 2


async def test_a_body_broken_while_buffered_is_covered_by_the_stale_entry(
    sidecar_factory: SidecarFactory, raw_upstream: Any, client: aiohttp.ClientSession, clock: Clock
) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nContent-Length: 5\r\n\r\nfirst",
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nContent-Length: 500\r\n\r\nonly part",
    ]

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()  # the second answer's body breaks off here

    port = await raw_upstream(behaviour)
    proxy = await sidecar_factory(cached_yaml(f"http://127.0.0.1:{port}"), wall_clock=clock)
    assert (await get(client, proxy))[1] == b"first"
    clock.advance(5)
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"], headers["x-sidecar-stale-reason"]) == (
        200, b"first", "STALE", "upstream_reset")


async def test_a_body_broken_without_a_stored_entry_is_the_error(
    sidecar_factory: SidecarFactory, raw_upstream: Any, client: aiohttp.ClientSession, clock: Clock
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 500\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    port = await raw_upstream(behaviour)
    proxy = await sidecar_factory(cached_yaml(f"http://127.0.0.1:{port}"), wall_clock=clock)
    cache = cache_of(proxy)
    status, _, headers = await get(client, proxy)
    assert (status, headers["x-sidecar-error"]) == (502, "upstream_reset")
    assert len(cache.store) == 0


async def test_an_open_breaker_is_covered_by_the_stale_entry(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    proxy = await sidecar_factory(cached_yaml(
        upstream.url, "retries: {attempts: 1}\ncircuit_breaker: {failure_threshold: 1, reset_timeout: 60s}"
    ), wall_clock=clock)
    upstream.on("/a", answer(Cache_Control="max-age=1"), answer(b"broken", status=500))
    await get(client, proxy)
    clock.advance(5)
    _, body, headers = await get(client, proxy)  # the 500 opens the breaker
    assert (body, headers["x-sidecar-stale-reason"]) == (BODY, "status_500")
    status, body, headers = await get(client, proxy)  # the breaker answers: the upstream is not asked
    assert (status, body, headers["x-sidecar-cache"], headers["x-sidecar-stale-reason"]) == (
        200, BODY, "STALE", "circuit_open")
    assert len(upstream.hits_for("/a")) == 2


async def test_waiters_share_a_failure_and_all_get_the_stale_entry(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    """In an outage a herd of callers makes one upstream request, and every one gets the last good answer."""
    gate = Gate()
    upstream.on("/a", answer(Cache_Control="max-age=1"), held(gate, b"down", status=503))
    await get(client, proxy)
    clock.advance(5)
    answers = await herd(client, proxy, gate, 20)
    assert {(status, body, headers["x-sidecar-cache"], headers["x-sidecar-stale-reason"])
            for status, body, headers in answers} == {(200, BODY, "STALE", "status_503")}
    assert len(upstream.hits_for("/a")) == 2


async def test_an_answer_from_the_entry_carries_its_own_request_id(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:

    async def echoing(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(body=BODY, headers={
            "Cache-Control": "max-age=60", "X-Request-Id": request.headers["X-Request-Id"]})

    upstream.on("/a", echoing)
    _, _, first = await get(client, proxy, X_Request_Id="first")
    _, _, second = await get(client, proxy, X_Request_Id="second")
    assert (first["X-Request-Id"], second["X-Request-Id"], second["x-sidecar-cache"]) == ("first", "second", "HIT")


async def test_a_204_is_stored_and_answered_without_a_body(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    upstream.on("/a", answer(b"", status=204, Cache_Control="max-age=60"))
    await get(client, proxy)
    status, body, headers = await get(client, proxy)
    assert (status, body, headers["x-sidecar-cache"]) == (204, b"", "HIT")
    assert "Content-Length" not in headers
    assert len(upstream.hits_for("/a")) == 1


async def test_a_get_with_a_body_bypasses_the_cache(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    cache = cache_of(proxy)
    async def search(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        hit.body = await request.read()
        return web.Response(body=hit.body, headers={"Cache-Control": "max-age=60"})

    upstream.on("/search", search)
    for query in (b'{"q": 1}', b'{"q": 2}'):
        async with client.get(proxy.url + "/search", data=query) as response:
            assert (response.status, await response.read(), response.headers["x-sidecar-cache"]) == (
                200, query, "BYPASS")
    assert [hit.body for hit in upstream.hits_for("/search")] == [b'{"q": 1}', b'{"q": 2}']
    assert len(cache.store) == 0


async def test_a_waiter_gives_up_at_its_own_deadline(
    proxy: RunningSidecar, upstream: Upstream, client: aiohttp.ClientSession, clock: Clock
) -> None:
    cache = cache_of(proxy)
    gate = Gate()
    upstream.on("/a", held(gate, Cache_Control="max-age=60"))
    leader = asyncio.create_task(get(client, proxy))
    await gate.until_waiting(1)
    status, _, headers = await get(client, proxy, x_sidecar_timeout_ms="50")  # waits, then gives up
    assert (status, headers["x-sidecar-error"]) == (504, "timeout")
    assert not leader.done()
    gate.release.set()
    assert (await leader)[0] == 200
    assert len(upstream.hits_for("/a")) == 1
    assert cache.coalescer.waiting == 0
