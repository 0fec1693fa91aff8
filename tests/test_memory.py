"""Bodies stream: 1 GiB up and 1 GiB down through a real sidecar process barely moves its memory."""

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
from tests.processes import one_route_config, wait_ready

GIB = 1024**3
CHUNK = b"\x5a" * (256 * 1024)
# "A few MiB": the sidecar holds a handful of socket buffers, never the body.
ALLOWED_GROWTH = 16 * 1024 * 1024


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
    config = one_route_config(tmp_path, upstream.url)
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
