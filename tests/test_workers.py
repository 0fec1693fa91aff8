"""Workers: N processes share the ports, metrics add up, a dead worker comes back, signals and cache
purges reach all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.runtime import purge_log, workers
from sidecar.runtime.purge_log import PurgeLog, open_for_workers
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


def delete(url: str) -> tuple[int, object]:
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5) as response:
        return response.status, json.loads(response.read())


@pytest.mark.timeout(60)
async def test_a_cache_purge_through_one_worker_reaches_every_worker(upstream: Upstream, tmp_path: Path) -> None:
    config = one_route_config(tmp_path, upstream.url, "shutdown: {drain_delay: 0s, timeout: 1s}\nlog: {access: false}",
                              route_extra="cache: {default_ttl: 1h}")
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config.path), "--workers", "2"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)

    async def get_until_upstream_saw(path: str, hits: int) -> None:
        """GETs over fresh connections (the kernel spreads them over the workers) until the upstream
        has seen `hits` requests for `path`: with two workers, each one missed once more."""
        async with asyncio.timeout(15):
            for _ in range(200):
                if len(upstream.hits_for(path)) >= hits:
                    break
                assert (await asyncio.to_thread(get, config.base + path))[0] == 200
        seen = len(upstream.hits_for(path))
        assert seen == hits, f"the upstream saw {seen} requests for {path}"

    try:
        await wait_until(lambda: stderr_path.read_text().count('"sidecar started"') == 2, limit=15)
        await get_until_upstream_saw("/items/1", 2)  # each worker has it cached
        await get_until_upstream_saw("/keep", 2)

        purge = config.admin + "/api/v1/cache?route=main&prefix=/items/"
        # The counts are the answering worker's: its one entry under /items/.
        assert await asyncio.to_thread(delete, purge) == (200, {"prefix": "/items/", "purged": {"main": 1}})

        await get_until_upstream_saw("/items/1", 4)  # both workers missed again (3 if only one purged)
        for _ in range(20):  # outside the prefix: still cached in both
            assert (await asyncio.to_thread(get, config.base + "/keep"))[0] == 200
        assert len(upstream.hits_for("/keep")) == 2

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def shared_fd() -> Iterator[int]:
    fd = open_for_workers()
    yield fd
    os.close(fd)


def test_the_purge_log_gives_each_worker_the_others_purges_from_when_it_started(shared_fd: int) -> None:
    first, second = PurgeLog(shared_fd, pid=1), PurgeLog(shared_fd, pid=2)
    assert first.append("main", "/items/") and second.append(None, "/")
    assert first.read() == ([(None, "/")], False)  # its own purge it applied already
    assert second.read() == ([("main", "/items/")], False)
    assert second.read() == ([], False)
    later = PurgeLog(shared_fd, pid=3)  # a restarted worker: its cache is empty, the past is not its
    assert first.append("main", "/x")
    assert later.read() == ([("main", "/x")], False)


def test_the_purge_log_waits_for_a_line_being_written_and_skips_what_is_not_a_purge(shared_fd: int) -> None:
    reader = PurgeLog(shared_fd, pid=1)
    os.write(shared_fd, b'{"route": null, "prefix": "/a", "pi')
    assert reader.read() == ([], False)
    os.write(shared_fd, b'd": 2}\nnot json\n["a"]\n{"route": 1, "prefix": "/", "pid": 2}\n')
    os.write(shared_fd, b'{"route": "main", "prefix": "/b", "pid": 2}\n')
    assert reader.read() == ([(None, "/a"), ("main", "/b")], False)


def test_the_purge_log_reads_a_long_backlog_in_bounded_steps(shared_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(purge_log, "READ_CHUNK", 100)
    reader, writer = PurgeLog(shared_fd, pid=1), PurgeLog(shared_fd, pid=2)
    for index in range(10):
        assert writer.append("main", f"/{index}")  # about 45 bytes a line
    seen: list[tuple[str | None, str]] = []
    for _ in range(10):
        purges, more = reader.read()
        assert len(purges) <= 2
        seen += purges
        if not more:
            break
    assert seen == [("main", f"/{index}") for index in range(10)]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP], ids=["purge", "reload"])
def test_a_worker_starts_with_forwarded_signals_held_until_it_handles_them(shared_fd: int, signum: int) -> None:
    # Forwarded before the worker has its handler, SIGUSR1 or SIGHUP must wait (their default
    # action ends the process): a restarted worker gets them while it starts.
    waits = f"import signal, sys; signal.sigwait({{{int(signum)}}}); sys.exit(7)"  # only a blocked signal waits
    process = workers._start([sys.executable, "-c", waits], dict(os.environ), 0, shared_fd)
    try:
        process.send_signal(signum)
        assert process.wait(10) == 7
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
