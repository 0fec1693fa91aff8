"""One measurement of one target for bench.py: warm-up, throughput (with the proxy's CPU time from /proc and
its RSS sampled throughout), then latency at a fixed rate.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from loadgen import LoadGen, Result
from procs import BenchError, Pinning, cpu_seconds_by_pid, cpus_busy_seconds, rss_mib
from servers import Server, log_tail, progress

RSS_SAMPLE_S = 0.05  # a /proc walk of a few processes every 50 ms: well under 1% of the load core


@dataclass
class Sample:
    """All measurements of one target in one round. The proxy fields stay NaN for the direct target."""

    throughput: Result
    latency: Result
    cpu_us_per_request: float = math.nan
    cpu_busy_pct: float = math.nan  # share of one core during the throughput run: ~100 means CPU-bound
    rss_peak_mib: float = math.nan  # the largest RSS sampled during the throughput run, summed over processes
    processes: int = 0  # processes whose CPU and RSS are summed: 1, or a supervisor (nginx master) + workers
    # With several processes: each one's share of one core during the throughput run, the root first.
    busy_pct_by_pid: dict[int, float] = field(default_factory=dict)
    # Busy time during the throughput run not spent by the proxy, % of 1 core. On the proxy's CPUs: the load
    # side when they share a core, else something competing with the proxy. On all CPUs: wrk and the upstream
    # (about 20% of a core at 6k req/s) plus anything else running, e.g. a test suite.
    others_busy_pct: float = math.nan
    machine_others_busy_pct: float = math.nan


class RssPeak:
    """Samples the RSS of `pid`'s process tree from a thread while the `with` block runs; `peak` is the max."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = math.nan
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssPeak:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._take()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self._take()

    def _take(self) -> None:
        rss, count = rss_mib(self.pid)
        if not math.isnan(rss) and not rss <= self.peak:  # NaN-safe max
            self.peak, self.processes = rss, count


def measure(server: Server, load: LoadGen, args: argparse.Namespace, pin: Pinning) -> Sample:
    """measure_once(), with a clearer error when the cause is that the proxy died under load."""
    try:
        return measure_once(server, load, args, pin)
    except BenchError as exc:
        if server.proc is None or server.proc.poll() is None:
            raise
        # The load generator's complaint ("connection refused") hides the real news: the proxy died.
        tail = log_tail(server.log) if server.log else "(no log)"
        raise BenchError(f"{server.name} exited with {server.proc.returncode} under load ({exc}); its log:\n"
                         f"{tail}") from exc


def measure_once(server: Server, load: LoadGen, args: argparse.Namespace, pin: Pinning) -> Sample:
    """Warm-up, throughput at --connections (sampling the CPU and RSS of the proxy's process tree around and
    during it), then latency at --rate."""
    name, url = server.name, server.url
    pid = server.proc.pid if server.proc else None
    if args.warmup > 0:
        # Opens the keep-alive connections and warms caches, so neither counts against the measured run.
        progress(f"{name}: warm-up {args.warmup}s")
        load.throughput(url, args.connections, args.warmup)
    progress(f"{name}: throughput, {args.connections} connections, {args.duration}s ({load.throughput_tool})")
    cpus = pin.sidecar_cpus
    wall_before, cores_before, all_before = time.monotonic(), cpus_busy_seconds(cpus), cpus_busy_seconds(None)
    cpu_before = cpu_seconds_by_pid(pid) if pid else {}
    if pid:
        with RssPeak(pid) as rss:
            throughput = load.throughput(url, args.connections, args.duration)
    else:
        throughput = load.throughput(url, args.connections, args.duration)
    cpu_after = cpu_seconds_by_pid(pid) if pid else {}
    wall, cores_busy = time.monotonic() - wall_before, cpus_busy_seconds(cpus) - cores_before
    all_busy = cpus_busy_seconds(None) - all_before
    progress(f"{name}: {throughput.rps:,.0f} req/s")
    progress(f"{name}: latency at {args.rate:g} req/s, {args.duration}s ({load.latency_tool})")
    latency = load.latency(url, args.rate, args.duration, args.connections, args.hey_workers)
    progress(f"{name}: p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms")
    sample = Sample(throughput, latency)
    if pid:
        # Summed over the tree, so a worker restarted mid-run still counts (see cpu_seconds_by_pid).
        cpu_used = sum(cpu_after.values()) - sum(cpu_before.values())
        seconds = throughput.seconds or math.nan
        sample.cpu_us_per_request = cpu_used / throughput.requests * 1e6 if throughput.requests else math.nan
        sample.cpu_busy_pct = cpu_used / seconds * 100
        sample.rss_peak_mib, sample.processes = rss.peak, rss.processes
        if cpus is not None:
            sample.others_busy_pct = max(0.0, cores_busy - cpu_used) / wall * 100
        sample.machine_others_busy_pct = max(0.0, all_busy - cpu_used) / wall * 100
        if len(cpu_after) > 1:
            sample.busy_pct_by_pid = {p: (cpu_after[p] - cpu_before.get(p, 0.0)) / seconds * 100 for p in cpu_after}
    return sample
