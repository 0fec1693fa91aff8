"""Workers: N processes share the ports, metrics add up, a dead worker comes back, signals reach all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Upstream, wait_until
from tests.processes import get, one_route_config, wait_ready

REQUESTS_200 = 'sidecar_requests_total{code="200",method="GET",route="main"}'


async def scraped_until(admin: str, series: str, value: float, limit: float = 5.0) -> str:
    """Scrape until `series` shows `value` (bounded in time); the last scrape's text."""
    async with asyncio.timeout(limit):
        while True:
            text = (await asyncio.to_thread(get, admin + "/metrics"))[1].decode()
            if scrape_value(text, series) == value:
                return text
            await asyncio.sleep(0.1)


def scrape_value(text: str, series: str) -> float:
    """Sum of the samples of one series name and label set prefix (several `pid` series add up)."""
    pattern = re.compile(rf"^{re.escape(series)}[^ ]* ([0-9.e+]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def worker_pids(stderr_path: Path) -> list[int]:
    pids = []
    for line in stderr_path.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("message") == "worker started":
            pids.append(json.loads(line)["pid"])
    return pids


@pytest.mark.timeout(90)
async def test_two_workers_share_the_port_add_up_metrics_restart_and_take_signals(
    upstream: Upstream, tmp_path: Path
) -> None:
    config = one_route_config(
        tmp_path, upstream.url, "shutdown: {drain_delay: 100ms, timeout: 2s}\nlog: {access: false}"
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--workers", "2"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        base, admin = config.base, config.admin
        await wait_until(lambda: len(worker_pids(stderr_path)) == 2)
        await asyncio.to_thread(wait_ready, admin, process)  # type: ignore[arg-type]
        # Both workers must be up before traffic, or one would take it all.
        await wait_until(lambda: stderr_path.read_text().count('"sidecar started"') == 2, limit=15)

        for _ in range(100):  # a new connection each time, so the kernel spreads them over the workers
            assert (await asyncio.to_thread(get, base + "/x"))[0] == 200
        assert len(upstream.hits) == 100
        # Each worker folds its tallies into the shared files every FLUSH_SECONDS.
        await scraped_until(admin, REQUESTS_200, 100)
        for _ in range(5):  # whichever worker answers the scrape, the sum is the same
            metrics = (await asyncio.to_thread(get, admin + "/metrics"))[1].decode()
            assert scrape_value(metrics, REQUESTS_200) == 100
            assert len(set(re.findall(r'sidecar_circuit_breaker_state\{pid="(\d+)"', metrics))) == 2

        process.send_signal(signal.SIGHUP)  # forwarded: every worker reloads
        await wait_until(lambda: stderr_path.read_text().count('"config reloaded"') == 2, limit=15)

        first, second = worker_pids(stderr_path)
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: len(worker_pids(stderr_path)) == 3, limit=15)  # a replacement started
        await wait_until(lambda: stderr_path.read_text().count('"sidecar started"') == 3, limit=15)
        for _ in range(20):
            assert (await asyncio.to_thread(get, base + "/y"))[0] == 200
        # The dead worker's requests still count; its live gauges are gone.
        metrics = await scraped_until(admin, REQUESTS_200, 120)
        assert f'pid="{first}"' not in metrics.split("sidecar_circuit_breaker_state", 1)[1].split("# HELP", 1)[0]
        assert scrape_value(metrics, "sidecar_in_flight_requests{") == 0

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
        for pid in (second, worker_pids(stderr_path)[2]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.timeout(60)
async def test_workers_stop_when_the_supervisor_is_killed(upstream: Upstream, tmp_path: Path) -> None:
    config = one_route_config(tmp_path, upstream.url, "shutdown: {drain_delay: 0s, timeout: 1s}")
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--workers", "2"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    await wait_until(lambda: stderr_path.read_text().count('"sidecar started"') == 2, limit=15)
    workers = worker_pids(stderr_path)
    process.kill()  # no chance to forward anything
    process.wait(10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_until(lambda: all(gone(pid) for pid in workers), limit=15)
