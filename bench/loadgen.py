"""Load generators for bench.py: wrk (throughput), hey (latency at a fixed rate), and pyload.py as the fallback
for either, plus the parsers that turn their output into a `Result`.

Every tool runs as a child process pinned to the load CPU, with a hard time limit (its own duration plus
TOOL_GRACE_S), through `Processes.run_tool`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import BenchError, Pinning, Processes

HERE = Path(__file__).resolve().parent
# How long a load generator may run past its own --duration before we treat it as hung and kill it.
TOOL_GRACE_S = 30.0


@dataclass
class Result:
    """One measurement. `requests` counts responses of any status; `errors` counts requests with none."""

    tool: str
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    errors: int
    p50_ms: float = math.nan
    p99_ms: float = math.nan


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> Result:
    total = _WRK_TOTAL.search(text)
    if total is None:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    requests, seconds = int(total.group(1)), float(total.group(2)) * _UNIT_S[total.group(3)]
    socket_errors = _WRK_SOCKET.search(text)
    non_2xx = _WRK_NON2XX.search(text)
    return Result(
        tool="wrk",
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        # wrk counts a 4xx/5xx as "Non-2xx or 3xx"; read/connect/write/timeout errors are requests that failed.
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
    )


_HEY_TOTAL = re.compile(r"Total:\s+([\d.]+) secs")
_HEY_PCT = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.MULTILINE)
_HEY_COUNT = re.compile(r"^\s*\[(\d+)\]\s+(\d+)", re.MULTILINE)
_HEY_ERROR = re.compile(r"^\s*\[(\d+)\]\s", re.MULTILINE)


def parse_hey(text: str) -> Result:
    total = _HEY_TOTAL.search(text)
    if total is None:
        raise BenchError(f"cannot parse hey output:\n{text}")
    seconds = float(total.group(1))
    percentiles = {int(p): float(s) * 1000 for p, s in _HEY_PCT.findall(text)}
    # "[200] 4999 responses" under "Status code distribution:", "[12] Get ...: error" under "Error distribution:".
    statuses, _, error_part = text.partition("Error distribution:")
    by_status = {int(code): int(n) for code, n in _HEY_COUNT.findall(statuses.split("Status code distribution:")[-1])}
    requests = sum(by_status.values())
    return Result(
        tool="hey",
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        non_2xx=sum(n for code, n in by_status.items() if not 200 <= code < 300),
        errors=sum(int(count) for count in _HEY_ERROR.findall(error_part)),
        # hey prints 4 decimals of seconds: 0.1 ms resolution. A missing line (too few samples) stays NaN.
        p50_ms=percentiles.get(50, math.nan),
        p99_ms=percentiles.get(99, math.nan),
    )


def parse_pyload(text: str) -> Result:
    data: dict[str, Any] = json.loads(text)
    return Result(tool=str(data["tool"]), requests=int(data["requests"]), seconds=float(data["seconds"]),
                  rps=float(data["rps"]), non_2xx=int(data["non_2xx"]), errors=int(data["errors"]),
                  p50_ms=float(data.get("p50_ms", math.nan)), p99_ms=float(data.get("p99_ms", math.nan)))


@dataclass(frozen=True)
class LoadGen:
    """Which tool runs which measurement; each falls back to pyload.py on its own."""

    throughput_tool: str  # "wrk" or "python"
    latency_tool: str  # "hey" or "python"
    procs: Processes
    pin: Pinning

    @classmethod
    def choose(cls, mode: str, procs: Processes, pin: Pinning) -> LoadGen:
        wrk = "wrk" if mode == "auto" and shutil.which("wrk") else "python"
        hey = "hey" if mode == "auto" and shutil.which("hey") else "python"
        return cls(wrk, hey, procs, pin)

    def throughput(self, url: str, connections: int, duration: int) -> Result:
        if self.throughput_tool == "wrk":
            # One thread is plenty for wrk on loopback, and leaves the rest of the load core to the upstream.
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", url]
            return parse_wrk(self._run(argv, duration))
        argv = self._pyload("throughput", url, "--connections", str(connections), "--duration", str(duration))
        return parse_pyload(self._run(argv, duration))

    def latency(self, url: str, rate: float, duration: int, connections: int, hey_workers: int) -> Result:
        if self.latency_tool == "hey":
            # hey rate-limits per worker (-q), so the total rate is split across the workers. Their tickers
            # start together and stay in step: the target sees bursts of `hey_workers` requests, not a
            # smooth stream, and p50 includes queueing behind the rest of the burst.
            per_worker = rate / hey_workers
            argv = ["hey", "-z", f"{duration}s", "-c", str(hey_workers), "-q", f"{per_worker:g}", url]
            return parse_hey(self._run(argv, duration))
        argv = self._pyload("latency", url, "--rate", f"{rate:g}", "--duration", str(duration),
                            "--connections", str(connections))
        return parse_pyload(self._run(argv, duration))

    def describe_latency(self, hey_workers: int) -> str:
        # The arrival pattern moves p50 a lot (see latency()), so the output says which one was used.
        if self.latency_tool == "hey":
            return f"hey ({hey_workers} workers, arrivals in bursts)"
        return "pyload.py (evenly spaced arrivals)"

    def _pyload(self, *args: str) -> list[str]:
        return [sys.executable, str(HERE / "pyload.py"), *args]

    def _run(self, argv: list[str], duration: int) -> str:
        return self.procs.run_tool(Pinning.prefix(self.pin.load_cpu) + argv, timeout=duration + TOOL_GRACE_S)
