"""Durable delivery in real `sidecar run` processes: kill -9 mid-burst, SIGHUP, --workers 2, a bad state dir."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream, wait_until
from tests.processes import ProcessConfig, free_port, wait_ready

pytestmark = pytest.mark.slow


def write_config(directory: Path, upstream_port: int, delivery: str = "", ports: tuple[int, int] | None = None,
                 route: str = "") -> ProcessConfig:
    port, admin = ports or (free_port(), free_port())
    config = ProcessConfig(directory / "sidecar.yaml", port, admin)
    config.path.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}\nlog: {{access: false}}\n"
        "shutdown: {drain_delay: 0s, timeout: 2s}\n"
        f'upstreams: {{up: {{endpoints: ["http://127.0.0.1:{upstream_port}"]}}}}\n'
        "routes: [{name: main, match: {path_prefix: /}, upstream: up, circuit_breaker: {reset_timeout: 100ms},"
        f"{route}\n"
        f"          delivery: {{backoff: {{base: 10ms, max: 50ms}}{delivery}}}}}]\n"
    )
    return config


def start(config: ProcessConfig, state: Path, *extra: str, stderr: Path | None = None) -> subprocess.Popen[bytes]:
    err = stderr.open("ab") if stderr else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--state-dir", str(state), *extra],
        stdout=subprocess.DEVNULL, stderr=err,
    )
    return process



@pytest.fixture
async def processes() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def accept_burst(session: aiohttp.ClientSession, url: str, tasks: int, acked: list[str]) -> None:
    """Post from `tasks` callers until the connection fails (the process was killed); ids that got 202 in `acked`."""

    async def caller(number: int) -> None:
        for sequence in range(5000):
            try:
                async with session.post(url, data=f"{number}-{sequence}".encode()) as response:
                    if response.status != 202:
                        return
                    acked.append((await response.json())["id"])
            except (aiohttp.ClientError, OSError):
                return

    await asyncio.gather(*(caller(number) for number in range(tasks)))


@pytest.mark.timeout(90)
async def test_kill_9_mid_burst_loses_no_acknowledged_message(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]],
    upstream_on: Callable[[Upstream, int], Awaitable[None]],
) -> None:
    upstream_port = free_port()  # down during the burst: everything stays queued
    # Messages the first process holds when it dies (claimed, their attempt under way) come back
    # after the lease: 2 s here instead of the default's 2 x 15 s + 10 s.
    config = write_config(tmp_path, upstream_port, ", concurrency: 8, lease: 2s", route=" timeouts: {total: 1s},")
    state = tmp_path / "state"
    processes.append(first := start(config, state))
    await asyncio.to_thread(wait_ready, config.admin, first)
    acked: list[str] = []
    async with aiohttp.ClientSession() as session:
        burst = asyncio.create_task(accept_burst(session, config.base + "/hook", 16, acked))
        await wait_until(lambda: len(acked) >= 300, limit=30)
        os.kill(first.pid, signal.SIGKILL)
        async with asyncio.timeout(15):
            await burst
    first.wait(10)
    upstream = Upstream("back")
    await upstream_on(upstream, upstream_port)
    processes.append(second := start(config, state))
    await asyncio.to_thread(wait_ready, config.admin, second)
    delivered = lambda: {hit.headers.get("Idempotency-Key") for hit in upstream.hits}  # noqa: E731
    await wait_until(lambda: set(acked) <= delivered(), limit=20)
    assert len(acked) == len(set(acked)) >= 300


@pytest.mark.timeout(60)
async def test_the_queue_survives_sighup_and_is_delivered_in_order(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]],
    upstream_on: Callable[[Upstream, int], Awaitable[None]],
) -> None:
    upstream_port = free_port()
    config = write_config(tmp_path, upstream_port)
    stderr = tmp_path / "stderr.log"
    processes.append(process := start(config, tmp_path / "state", stderr=stderr))
    await asyncio.to_thread(wait_ready, config.admin, process)
    ids = []
    async with aiohttp.ClientSession() as session:
        for number in range(10):
            async with session.post(config.base + "/hook", data=str(number).encode()) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
        # The route changes (so its deliverer is replaced), the queue stays.
        write_config(tmp_path, upstream_port, ", max_attempts: 1000", (config.port, config.admin_port))
        process.send_signal(signal.SIGHUP)
        await wait_until(lambda: '"config reloaded"' in stderr.read_text(), limit=15)
        upstream = Upstream("back")
        await upstream_on(upstream, upstream_port)
        await wait_until(lambda: len(upstream.hits) >= 10, limit=20)
        assert [hit.body for hit in upstream.hits] == [str(n).encode() for n in range(10)]
        assert [hit.headers["Idempotency-Key"] for hit in upstream.hits] == ids


@pytest.mark.timeout(90)
async def test_two_workers_share_the_queue_and_deliver_in_order_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]],
    upstream_on: Callable[[Upstream, int], Awaitable[None]],
) -> None:
    upstream_port = free_port()
    config = write_config(tmp_path, upstream_port)
    stderr = tmp_path / "stderr.log"
    processes.append(process := start(config, tmp_path / "state", "--workers", "2", stderr=stderr))
    await wait_until(lambda: stderr.exists() and stderr.read_text().count('"sidecar started"') == 2, limit=20)
    await asyncio.to_thread(wait_ready, config.admin, process)
    ids = []
    async with aiohttp.ClientSession() as session:
        for number in range(40):  # new connections: the kernel spreads them over both workers
            async with session.post(config.base + "/hook", data=str(number).encode(),
                                    headers={"Connection": "close"}) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
    upstream = Upstream("back")
    await upstream_on(upstream, upstream_port)
    await wait_until(lambda: len(upstream.hits) >= 40, limit=30)
    await asyncio.sleep(0)
    assert [hit.headers["Idempotency-Key"] for hit in upstream.hits] == ids
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 20) == 0
    assert len(upstream.hits) == 40  # none twice


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_state_dir_that_cannot_be_written_is_a_clear_error_at_start(tmp_path: Path, workers: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--state-dir", str(blocker / "state"),
         "--workers", workers],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(blocker / "state") in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_state_dir_is_a_clear_error_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    config = write_config(tmp_path, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(state) in result.stderr
