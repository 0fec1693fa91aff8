"""Bodies stream: 1 GiB up and 1 GiB down through a real sidecar process barely moves its memory;
and a route's response cache holds at most its max_bytes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Hit, Upstream
from tests.processes import ProcessConfig, free_port, one_route_config, wait_ready

GIB = 1024**3
CHUNK = b"\x5a" * (256 * 1024)
# "A few MiB": the sidecar holds a handful of socket buffers, never the body.
ALLOWED_GROWTH = 16 * 1024 * 1024
# SIGTERM at the end stops the process at once: the default drain_delay (5 s of serving on
# for the app's last calls) would be most of each test's time.
NO_DRAIN = "shutdown: {drain_delay: 0s}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def peak_rss(pid: int, stop: asyncio.Event) -> int:
    peak = rss_bytes(pid)
    while not stop.is_set():
        peak = max(peak, rss_bytes(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    return peak


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the sidecar's memory")
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_one_gib_each_way_grows_sidecar_memory_by_a_few_mib_at_most(
    tmp_path: Path, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def sink(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        received = 0
        while chunk := await request.content.readany():
            received += len(chunk)
        return web.Response(text=str(received))

    async def source(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(GIB)})
        await response.prepare(request)
        for _ in range(GIB // len(CHUNK)):
            await response.write(CHUNK)
        return response

    upstream.on("/sink", sink)
    upstream.on("/source", source)
    config = one_route_config(tmp_path, upstream.url, NO_DRAIN)
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_ready, config.admin, process)
        base = config.base
        async with client.get(base + "/warm") as response:  # pools, imports and buffers are warm
            await response.read()
        baseline = rss_bytes(process.pid)
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_rss(process.pid, stop))

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(GIB // len(CHUNK)):
                yield CHUNK

        async with client.post(base + "/sink", data=upload(), headers={"Content-Length": str(GIB)}) as response:
            assert response.status == 200
            assert await response.text() == str(GIB)
        downloaded = 0
        async with client.get(base + "/source") as response:
            while chunk := await response.content.readany():
                downloaded += len(chunk)
        assert downloaded == GIB
        stop.set()
        peak = await watcher
        assert peak - baseline < ALLOWED_GROWTH, f"grew by {(peak - baseline) / 2**20:.1f} MiB"
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 15)


CACHE_MAX = 8 * 1024 * 1024
CACHED_BODY = b"\x5a" * (256 * 1024)  # within the default max_entry (1 MiB): every answer is stored
CACHED_PATHS = 256  # 64 MiB of distinct answers through a cache of 8 MiB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the sidecar's memory")
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_the_cache_never_grows_beyond_max_bytes(
    tmp_path: Path, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """64 MiB of storable answers through a route whose cache may hold 8 MiB: /metrics shows the
    cache at most at max_bytes, evicting, and the process's peak RSS grows by about that, not by 64 MiB."""

    async def cacheable(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(body=CACHED_BODY, headers={"Cache-Control": "max-age=600"})

    for index in range(CACHED_PATHS):
        upstream.on(f"/item/{index}", cacheable)
    upstream.on("/warm", cacheable)
    config = ProcessConfig(tmp_path / "sidecar.yaml", free_port(), free_port())
    config.path.write_text(
        f"listen: 127.0.0.1:{config.port}\nadmin: {{listen: 127.0.0.1:{config.admin_port}}}\n"
        f"log: {{access: false}}\n{NO_DRAIN}\n"
        f'upstreams: {{up: {{endpoints: ["{upstream.url}"]}}}}\n'
        f"routes: [{{name: main, match: {{path_prefix: /}}, upstream: up, cache: {{max_bytes: {CACHE_MAX}}}}}]\n"
    )
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_ready, config.admin, process)
        base = config.base
        for _ in range(2):  # pools, imports and buffers are warm; one entry is stored
            async with client.get(base + "/warm") as response:
                assert len(await response.read()) == len(CACHED_BODY)
        baseline = rss_bytes(process.pid)
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_rss(process.pid, stop))
        for index in range(CACHED_PATHS):
            async with client.get(f"{base}/item/{index}") as response:
                assert (response.status, response.headers["x-sidecar-cache"]) == (200, "MISS")
                assert len(await response.read()) == len(CACHED_BODY)
        stop.set()
        peak = await watcher
        async with client.get(config.admin + "/metrics") as response:
            scraped = await response.text()
        held = metric_value(scraped, 'sidecar_cache_bytes{route="main"}')
        assert CACHE_MAX - 2 * len(CACHED_BODY) < held <= CACHE_MAX
        assert metric_value(scraped, 'sidecar_cache_evictions_total{route="main"}') > CACHED_PATHS - 40
        assert peak - baseline < CACHE_MAX + ALLOWED_GROWTH, f"grew by {(peak - baseline) / 2**20:.1f} MiB"
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 15)


def metric_value(scraped: str, series: str) -> float:
    """The value of one series (name and labels exactly as printed) in Prometheus text."""
    for line in scraped.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} is not in the scrape")
