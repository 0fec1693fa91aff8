"""Durable delivery with `store: redis://`: two real `sidecar run` processes share one redis-server.

Each process stands for a pod of a Deployment: its own ports and state directory, the same Redis.
Every config has an ordered route (`concurrency: 1`: the head of the line is claimed with XCLAIM)
and a parallel one (`concurrency: 4`: new entries by XREADGROUP, a dead pod's by XAUTOCLAIM).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gate, Hit, Upstream, wait_until
from tests.processes import ProcessConfig, free_port, wait_ready
from tests.redis_server import REDIS, RedisServer

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run installs it)")

ROUTES = ("ordered", "parallel")
CONCURRENCY = {"ordered": 1, "parallel": 4}


def write_config(directory: Path, upstream_port: int, store: str, total: str = "1s", lease: str = "") -> ProcessConfig:
    """One sidecar's config: both routes queue to `store`. The lease is `lease`, by default 2 x `total` + 10 s."""
    directory.mkdir()
    lease_key = f", lease: {lease}" if lease else ""
    config = ProcessConfig(directory / "sidecar.yaml", free_port(), free_port())
    routes = "".join(
        f"  - {{name: {name}, match: {{path_prefix: /{name}}}, upstream: up, timeouts: {{total: {total}}},\n"
        f"     circuit_breaker: {{reset_timeout: 100ms}}, delivery: {{concurrency: {CONCURRENCY[name]},\n"
        f"       max_attempts: 100000, backoff: {{base: 10ms, max: 50ms}}{lease_key}}}}}\n"
        for name in ROUTES
    )
    config.path.write_text(
        f"listen: 127.0.0.1:{config.port}\nadmin: {{listen: 127.0.0.1:{config.admin_port}}}\nlog: {{access: false}}\n"
        "shutdown: {drain_delay: 0s, timeout: 2s}\n"
        f'delivery: {{store: "{store}"}}\n'
        f'upstreams: {{up: {{endpoints: ["http://127.0.0.1:{upstream_port}"]}}}}\n'
        f"routes:\n{routes}"
    )
    return config


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory).start()
    yield server
    server.stop()


@pytest.fixture
async def sidecars() -> AsyncIterator[Callable[..., Awaitable[list[subprocess.Popen[bytes]]]]]:
    """start(*configs): one `sidecar run` per config (each with its own state dir), ready when it returns."""
    started: list[subprocess.Popen[bytes]] = []

    async def start(*configs: ProcessConfig) -> list[subprocess.Popen[bytes]]:
        processes = []
        for config in configs:
            state = config.path.parent / "state"
            err = (config.path.parent / "stderr.log").open("ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--state-dir", str(state)],
                stdout=subprocess.DEVNULL, stderr=err,
            )
            err.close()
            started.append(process)
            processes.append(process)
        await asyncio.gather(*(asyncio.to_thread(wait_ready, config.admin, process)
                               for config, process in zip(configs, processes, strict=True)))
        return processes

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)



async def slow_echo(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    """An upstream that takes 50 ms per request, so each pod finds the other's attempts in flight."""
    hit.body = await request.content.read()
    await asyncio.sleep(0.05)
    return web.Response(text="ok")


async def accept(session: aiohttp.ClientSession, url: str, body: str, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    async with session.post(url, data=body.encode(), headers=headers) as response:
        assert response.status == 202, await response.text()
        message_id: str = (await response.json())["id"]
        return message_id


async def listed(session: aiohttp.ClientSession, admin: str, route: str) -> list[dict[str, Any]]:
    async with session.get(f"{admin}/api/v1/deliveries", params={"route": route, "limit": "1000"}) as response:
        assert response.status == 200, await response.text()
        deliveries: list[dict[str, Any]] = (await response.json())["deliveries"]
        return deliveries


async def until_delivered(session: aiohttp.ClientSession, admin: str, ids: dict[str, list[str]], limit: float) -> None:
    """Poll the admin API (bounded) until every id of every route is `delivered`."""
    async with asyncio.timeout(limit):
        for route, wanted in ids.items():
            while True:
                statuses = {m["id"]: m["status"] for m in await listed(session, admin, route)}
                if all(statuses.get(message_id) == "delivered" for message_id in wanted):
                    break
                await asyncio.sleep(0.05)


async def deliveries_total(session: aiohttp.ClientSession, admin: str, route: str, outcome: str) -> float:
    """sidecar_deliveries_total{route, outcome} as the admin listener's /metrics shows it (0 when absent)."""
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sidecar_deliveries_total" and sample.labels == {"route": route, "outcome": outcome}:
                return sample.value
    return 0.0


def keys(upstream: Upstream, route: str) -> list[str]:
    """The Idempotency-Key of each request the upstream got on the route, in arrival order."""
    return [hit.headers["Idempotency-Key"] for hit in upstream.hits_for(f"/{route}")]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_two_sidecars_share_one_queue_and_deliver_each_message_exactly_once(
    tmp_path: Path, redis_server: RedisServer, sidecars: Callable[..., Awaitable[list[subprocess.Popen[bytes]]]],
    upstream_on: Callable[[Upstream, int], Awaitable[None]],
) -> None:
    upstream_port = free_port()  # down while the messages are accepted
    a = write_config(tmp_path / "a", upstream_port, redis_server.url)
    b = write_config(tmp_path / "b", upstream_port, redis_server.url)
    await sidecars(a, b)
    ids: dict[str, list[str]] = {route: [] for route in ROUTES}
    async with aiohttp.ClientSession() as session:
        for number in range(20):
            for route in ROUTES:
                ids[route].append(await accept(session, f"{a.base}/{route}", f"{route}-{number}"))
        for route in ROUTES:  # B never saw these requests: it reads them from the shared store
            assert [m["id"] for m in await listed(session, b.admin, route)] == ids[route]
        upstream = Upstream("back")
        for route in ROUTES:
            upstream.on(f"/{route}", slow_echo)
        await upstream_on(upstream, upstream_port)
        await until_delivered(session, b.admin, ids, limit=20)
    for route in ROUTES:
        bodies = Counter(hit.body for hit in upstream.hits_for(f"/{route}"))
        assert bodies == {f"{route}-{number}".encode(): 1 for number in range(20)}
    assert keys(upstream, "ordered") == ids["ordered"]  # one line across both pods: in the order accepted


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_sidecar_killed_mid_delivery_leaves_its_messages_to_the_other(
    tmp_path: Path, redis_server: RedisServer, sidecars: Callable[..., Awaitable[list[subprocess.Popen[bytes]]]],
    upstream_factory: Callable[[str], Awaitable[Upstream]],
) -> None:
    # A's upstream takes its requests and never answers, so A dies with attempts in flight; B's
    # answers at once, so what B delivers is told apart from what A sent. A's long timeout only
    # makes sure none of its attempts times out (and is recorded) before the kill; taking over is
    # decided by B's lease: 2 s of idleness of A's claims, measured by Redis (the default,
    # 2 x 1 s + 10 s, would be longer than the wait below allows).
    hold, fine = await upstream_factory("hold"), await upstream_factory("fine")
    gate = Gate()
    for route in ROUTES:
        hold.on(f"/{route}", gate)
    a = write_config(tmp_path / "a", hold.port, redis_server.url, total="60s")
    b = write_config(tmp_path / "b", fine.port, redis_server.url, total="1s", lease="2s")
    first, _ = await sidecars(a, b)
    ids: dict[str, list[str]] = {route: [] for route in ROUTES}
    async with aiohttp.ClientSession() as session:
        for number in range(10):
            for route in ROUTES:
                ids[route].append(await accept(session, f"{a.base}/{route}", f"{route}-{number}"))
        await wait_until(lambda: all(hold.hits_for(f"/{route}") for route in ROUTES), limit=10)
        first.kill()
        await asyncio.to_thread(first.wait, 10)
        gate.release.set()  # the held requests are answered to nobody: A's connections died with it
        held = {route: keys(hold, route) for route in ROUTES}
        await until_delivered(session, b.admin, ids, limit=10)
        for route in ROUTES:
            assert set(held[route]) <= set(ids[route])
            assert Counter(keys(fine, route)) == Counter(ids[route])  # each once: B did not crash
            for message_id in held[route]:  # A's attempt left no record: B's was the first counted
                async with session.get(f"{b.admin}/api/v1/deliveries/{message_id}") as response:
                    view = await response.json()
                assert (view["status"], view["attempts"]) == ("delivered", 1)
    assert keys(fine, "ordered") == ids["ordered"]


@pytest.mark.timeout(30)
async def test_an_idempotency_key_is_shared_by_the_sidecars(
    tmp_path: Path, redis_server: RedisServer, sidecars: Callable[..., Awaitable[list[subprocess.Popen[bytes]]]],
    upstream_factory: Callable[[str], Awaitable[Upstream]],
) -> None:
    upstream = await upstream_factory("up")
    a = write_config(tmp_path / "a", upstream.port, redis_server.url)
    b = write_config(tmp_path / "b", upstream.port, redis_server.url)
    await sidecars(a, b)
    async with aiohttp.ClientSession() as session:
        first = await accept(session, f"{a.base}/parallel", "first", key="order-42")
        again = await accept(session, f"{b.base}/parallel", "second", key="order-42")
        assert again == first
        await until_delivered(session, b.admin, {"parallel": [first]}, limit=10)
        assert [m["id"] for m in await listed(session, a.admin, "parallel")] == [first]
        # B counted the second request as a duplicate (its counters reach /metrics within a second).
        async with asyncio.timeout(10):
            while await deliveries_total(session, b.admin, "parallel", "deduplicated") != 1:
                await asyncio.sleep(0.05)
    assert [(hit.body, hit.headers["Idempotency-Key"]) for hit in upstream.hits] == [(b"first", "order-42")]
