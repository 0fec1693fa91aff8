"""Graceful shutdown under load: not ready at once, serving through the drain delay, nothing lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Hit, Upstream, wait_until
from tests.processes import one_route_config, wait_ready


@pytest.mark.timeout(60)
async def test_sigterm_drains_without_failing_a_request_started_before_the_listener_closed(
    upstream: Upstream, tmp_path: Path
) -> None:
    async def slowish(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    long_started = asyncio.Event()
    release_long = asyncio.Event()

    async def long(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        long_started.set()
        async with asyncio.timeout(30):
            await release_long.wait()  # released once the listener has closed
        return web.Response(text="finished")

    upstream.on("/work", slowish)
    upstream.on("/long", long)
    config = one_route_config(
        tmp_path, upstream.url, "shutdown: {drain_delay: 1s, timeout: 5s}\nlog: {access: false}"
    )
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base, admin = config.base, config.admin
    await asyncio.to_thread(wait_ready, admin, process)  # type: ignore[arg-type]
    ok = refused = 0
    failures: list[str] = []

    async def caller(session: aiohttp.ClientSession) -> None:
        nonlocal ok, refused
        for _ in range(5000):  # bounded: ends when the listener refuses connections
            try:
                async with session.get(base + "/work") as response:
                    assert await response.text() == "ok"
                    ok += 1
            except aiohttp.ClientConnectorError:
                refused += 1  # never started: the listener was closed
                return
            except (aiohttp.ClientError, AssertionError) as exc:
                failures.append(repr(exc))
                return

    async with aiohttp.ClientSession() as session:
        callers = [asyncio.create_task(caller(session)) for _ in range(8)]
        await wait_until(lambda: ok >= 16 or bool(failures), limit=15)
        process.send_signal(signal.SIGTERM)
        long_request = asyncio.create_task(session.get(base + "/long"))  # starts inside the drain delay
        async with asyncio.timeout(5), session.get(admin + "/readyz") as response:
            assert response.status == 503  # at once: no new traffic should be sent here
        # Still serving during the drain delay: more answers than the 8 that were in flight
        # when the signal came means requests started after it were served.
        served_at_signal = ok
        await wait_until(lambda: ok > served_at_signal + 8 or bool(failures), limit=2)
        async with asyncio.timeout(5):
            await long_started.wait()
        await asyncio.gather(*callers)  # each ends when the listener refuses its connection
        release_long.set()  # in flight since before the listener closed: it must still finish
        long_response = await long_request
        assert long_response.status == 200 and await long_response.text() == "finished"
        long_response.close()
    assert failures == []
    assert refused == 8 and ok > 0
    assert await asyncio.to_thread(process.wait, 15) == 0
