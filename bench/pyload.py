"""A small aiohttp load generator, the fallback when wrk / hey are not installed.

    python bench/pyload.py throughput URL --connections 64 --duration 10
    python bench/pyload.py latency URL --rate 1000 --duration 10

Prints one JSON object on stdout. It runs in its own process (not inside bench.py) so that it can be
pinned with taskset like wrk and hey, and so that its CPU use never lands on the benchmark driver.
A Python client tops out far below wrk: with it, throughput numbers mostly measure the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp

REQUEST_TIMEOUT_S = 10.0
# Hard cap on requests per run, on top of the time limit, so that no loop is bounded by time alone.
MAX_REQUESTS = 50_000_000
# Extra time allowed after the deadline for in-flight requests to finish before we give up on them.
DRAIN_S = REQUEST_TIMEOUT_S + 1.0


@dataclass
class Tally:
    requests: int = 0  # completed with a response, any status
    non_2xx: int = 0
    errors: int = 0  # no response at all: connect/read errors, timeouts
    latencies_s: list[float] = field(default_factory=list)


async def fetch(session: aiohttp.ClientSession, url: str, tally: Tally) -> bool:
    """One GET; the body is read in full so the connection goes back to the pool."""
    try:
        async with session.get(url) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        tally.errors += 1
        return False
    tally.requests += 1
    if not 200 <= response.status < 300:
        tally.non_2xx += 1
    return True


def new_session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


async def throughput(url: str, connections: int, duration: float) -> dict[str, object]:
    """Closed loop: `connections` workers, each sending its next request as soon as the last one ends."""
    tally = Tally()
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        while time.perf_counter() < deadline and tally.requests + tally.errors < MAX_REQUESTS:
            await fetch(session, url, tally)

    async with new_session(connections) as session:
        await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {**summary(tally), "seconds": elapsed, "rps": tally.requests / elapsed}


async def latency(url: str, rate: float, duration: float, connections: int) -> dict[str, object]:
    """Open loop at a fixed rate: request i starts at start + i/rate whatever the earlier ones are doing.

    Latency is timed from when each request actually starts, like hey does. Timing from the *scheduled* start
    would be fairer to queueing, but the event loop's timers have millisecond granularity (uvloop's clock too),
    so it would mostly measure our own scheduler. A late scheduler catches up: the average rate holds.
    """
    tally = Tally()
    total = max(1, min(int(rate * duration), MAX_REQUESTS))
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        sent = time.perf_counter()
        if await fetch(session, url, tally):
            tally.latencies_s.append(time.perf_counter() - sent)

    async with new_session(connections) as session:
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
        tally.errors += len(pending)
        elapsed = time.perf_counter() - start
    lat = sorted(tally.latencies_s)
    return {
        **summary(tally),
        "seconds": elapsed,
        "rps": tally.requests / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
    }


def summary(tally: Tally) -> dict[str, object]:
    result = asdict(tally)
    del result["latencies_s"]  # thousands of samples: the caller only wants the percentiles
    return result


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN when there is no sample (so a dead target cannot look fast)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the client should be the cheapest part of the measurement."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description="aiohttp load generator (bench fallback)")
    parser.add_argument("mode", choices=("throughput", "latency"))
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        if args.mode == "throughput":
            result = runner.run(throughput(args.url, args.connections, args.duration))
        else:
            result = runner.run(latency(args.url, args.rate, args.duration, args.connections))
    result["tool"] = "python-aiohttp" + ("+uvloop" if loop_factory() else "")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
