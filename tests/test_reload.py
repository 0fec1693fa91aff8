"""Hot reload: invalid configs are refused whole, valid ones swap atomically under load, state is kept."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SidecarFactory, Upstream, answering, with_test_listeners
from tests.processes import free_port, get, wait_ready

sick = answering(503)


def two_routes(upstream: Upstream, attempts: int = 1, extra_route: str = "") -> str:
    return f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - {{name: a, match: {{path_prefix: /a}}, upstream: up, retries: {{attempts: 1}},
              circuit_breaker: {{failure_threshold: 2, reset_timeout: 30s}}}}
          - {{name: b, match: {{path_prefix: /b}}, upstream: up, retries: {{attempts: {attempts}}}}}
        {extra_route}
    """


async def reload_via_api(client: aiohttp.ClientSession, admin: str) -> tuple[int, dict]:
    async with client.post(admin + "/api/v1/reload") as response:
        return response.status, await response.json()


async def test_invalid_config_is_refused_whole_with_the_check_message_and_the_old_one_serves(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(two_routes(upstream), config_file=path)
    path.write_text(path.read_text().replace("upstream: up, retries: {attempts: 1}", "upstream: nope, retries: {}"))
    status, body = await reload_via_api(client, proxy.admin)
    check = subprocess.run([sys.executable, "-m", "sidecar", "check", str(path)], capture_output=True, text=True,
                           timeout=30)
    assert status == 400 and body["error"] == "invalid_config"
    assert body["message"] == check.stderr.strip()
    assert "unknown upstream `nope`" in body["message"]
    assert proxy.metric("sidecar_config_reloads_total", result="failure") == 1
    assert proxy.metric("sidecar_config_reloads_total", result="success") == 1  # the start
    async with client.get(proxy.url + "/a") as response:
        assert response.status == 200


async def test_unchanged_routes_keep_their_breaker_and_changed_ones_start_fresh(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    upstream.on("/a", sick)
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(two_routes(upstream), config_file=path)
    for _ in range(2):
        async with client.get(proxy.url + "/a"):
            pass
    assert proxy.metric("sidecar_circuit_breaker_state", route="a", state="open") == 1
    path.write_text(with_test_listeners(two_routes(upstream, attempts=3)))  # only route b changes
    assert (await reload_via_api(client, proxy.admin))[0] == 200
    async with client.get(proxy.url + "/a") as response:
        assert response.headers["x-sidecar-error"] == "circuit_open"  # a kept its open breaker
    assert proxy.sidecar.route_states["b"].breaker is not None
    path.write_text(path.read_text().replace("failure_threshold: 2", "failure_threshold: 3"))
    assert (await reload_via_api(client, proxy.admin))[0] == 200
    async with client.get(proxy.url + "/a") as response:
        assert response.status == 503 and "x-sidecar-error" not in response.headers  # a new, closed breaker
    assert proxy.metric("sidecar_config_reloads_total", result="success") == 3


async def test_listener_changes_bind_new_ports_and_drain_removed_ones(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(two_routes(upstream), config_file=path)
    extra = f"  - {{name: c, listen: '127.0.0.1:{port}', upstream: up}}"
    path.write_text(with_test_listeners(two_routes(upstream, extra_route=extra)))
    assert (await reload_via_api(client, proxy.admin))[0] == 200
    async with client.get(f"http://127.0.0.1:{port}/anything") as response:
        assert response.status == 200
    path.write_text(with_test_listeners(two_routes(upstream)))
    assert (await reload_via_api(client, proxy.admin))[0] == 200
    async with asyncio.timeout(5):
        while True:
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(f"http://127.0.0.1:{port}/x"):
                    pass
            except aiohttp.ClientConnectorError:
                break  # the removed listener no longer accepts
            await asyncio.sleep(0.02)
    async with client.get(proxy.url + "/b") as response:
        assert response.status == 200


async def test_twenty_reloads_under_concurrent_load_see_zero_errors(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(two_routes(upstream), config_file=path)
    variants = [with_test_listeners(two_routes(upstream, attempts=n)) for n in (1, 2, 3)]
    broken = with_test_listeners(two_routes(upstream)).replace("routes:", "routez:")
    done = asyncio.Event()
    outcomes: list[int | str] = []

    async def caller(route: str) -> None:
        for _ in range(10_000):  # bounded; stops when the reloads are done
            if done.is_set():
                return
            try:
                async with client.get(f"{proxy.url}/{route}") as response:
                    await response.read()
                    outcomes.append(response.status)
            except aiohttp.ClientError as exc:
                outcomes.append(repr(exc))

    callers = [asyncio.create_task(caller(route)) for route in ("a", "b") * 4]
    statuses = []
    for number in range(20):
        path.write_text(broken if number % 5 == 4 else variants[number % 3])
        statuses.append((await reload_via_api(client, proxy.admin))[0])
        await asyncio.sleep(0.01)
    done.set()
    await asyncio.gather(*callers)
    assert statuses.count(200) == 16 and statuses.count(400) == 4
    assert len(outcomes) > 100
    assert set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]


@pytest.mark.timeout(60)
async def test_sighup_and_watch_reload_a_running_process(upstream: Upstream, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "sidecar.yaml"
    head = f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin_port}}}\n"
    head += "shutdown: {drain_delay: 50ms, timeout: 1s}\nlog: {access: false}\n"
    route = "  - {{name: {name}, match: {{path_prefix: /{name}}}, upstream: up}}\n"
    base = head + f'upstreams: {{up: {{endpoints: ["{upstream.url}"]}}}}\nroutes:\n' + route.format(name="one")
    path.write_text(base)
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(path), "--watch", "0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        await asyncio.to_thread(wait_ready, admin, process)  # type: ignore[arg-type]

        async def served(path_: str) -> int:
            return (await asyncio.to_thread(get, f"http://127.0.0.1:{port}{path_}"))[0]

        assert await served("/two") == 404
        path.write_text(base + route.format(name="two"))  # --watch notices
        async with asyncio.timeout(10):
            while await served("/two") != 200:
                await asyncio.sleep(0.05)
        # Same size and mtime as before: the watcher cannot see this change; SIGHUP must do it.
        before = path.stat()
        path.write_text(base + route.format(name="six"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        await asyncio.sleep(0.3)
        assert await served("/six") == 404
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while await served("/six") != 200:
                await asyncio.sleep(0.05)
        assert await served("/two") == 404
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
