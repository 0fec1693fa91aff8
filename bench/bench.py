"""Benchmark the sidecar: one fast upstream, measured directly, through the sidecar and through a naive proxy.

    python bench/bench.py [--duration 10] [--warmup 1] [--rate 1000] [--connections 64] [--hey-workers 10]
                          [--loop asyncio|uvloop] [--upstream auto|nginx|aiohttp] [--loadgen auto|python]
                          [--access-log on|off] [--retries on|off] [--workers N] [--sidecar-cpus LIST]
                          [--baseline none|naive] [--no-pin] [--json]

Everything listens on 127.0.0.1 only, every phase is bounded in time, and every child process is killed on the
way out (normal exit, exception, Ctrl-C, SIGTERM). Progress goes to stderr; the table (or JSON) to stdout.
Exit status: 0 when every request got a 2xx, 1 when some did not (the table is still printed), 2 on setup errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from procs import (
    BenchError,
    Pinning,
    Processes,
    children,
    cpu_seconds_by_pid,
    cpus_busy_seconds,
    listening_sockets,
    machine_busy_pct,
    parse_cpu_list,
    rss_mib,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BODY_SIZE = 1024
READY_TIMEOUT_S = 10.0
# How long a load generator may run past its own --duration before we treat it as hung and kill it.
TOOL_GRACE_S = 30.0
# Bounds on the options, so a typo cannot start an hour-long or machine-melting run.
MAX_DURATION_S = 600
MAX_RATE = 100_000
MAX_CONNECTIONS = 1024
MAX_WORKERS = 32
# Above this share of CPU in use by others before the start, the results are flagged as noisy.
BUSY_WARN_PCT = 10.0
# The bench's sidecar config sets these so that teardown takes a moment, not the default 5 s drain.
SHUTDOWN_CONFIG = "{drain_delay: 0s, timeout: 2s}"


def progress(message: str) -> None:
    # stderr, so that `--json` leaves stdout machine-readable.
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- ports and readiness ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. The sockets are held open together so that the kernel cannot
    hand out the same port twice; a small race remains (someone may bind one before our server does)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """Status and body, or None when nothing answered (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Poll `url` until it answers 200: bounded by READY_TIMEOUT_S, and fails fast if the process died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} while starting:\n{log_tail(log)}")
        answer = http_get(url, timeout=0.5)
        if answer is not None and answer[0] == 200:
            return
        time.sleep(0.05)
    raise BenchError(f"{what} not ready at {url} after {READY_TIMEOUT_S:.0f}s:\n{log_tail(log)}")


def check_response(url: str, what: str) -> None:
    """One request before measuring: a 200 with the 1 KiB body, so we benchmark the path we think we do."""
    answer = http_get(url, timeout=2.0)
    if answer is None or answer[0] != 200 or len(answer[1]) != BODY_SIZE:
        got = "no answer" if answer is None else f"status {answer[0]}, {len(answer[1])} body bytes"
        raise BenchError(f"{what} at {url}: expected 200 with {BODY_SIZE} body bytes, got {got}")


# --- upstream and sidecar --------------------------------------------------------------------------------


def nginx_conf(tmp: Path, port: int) -> str:
    body = "x" * BODY_SIZE
    # All paths in the temp dir, so nginx needs nothing from /var and leaves nothing behind. keepalive_requests
    # is raised because nginx's default (1000) would close wrk's connections mid-run and measure reconnects.
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"""


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    return f"nginx {match.group(1)}" if match else "nginx"


def start_upstream(kind: str, procs: Processes, port: int, pin: Pinning) -> str:
    """Start the fast upstream on `port`; return a label saying what it is."""
    nginx = shutil.which("nginx")
    if kind == "nginx" and nginx is None:
        raise BenchError("--upstream nginx: no nginx binary on PATH")
    if kind != "aiohttp" and nginx is not None:
        conf = procs.logdir / "nginx.conf"
        conf.write_text(nginx_conf(procs.logdir, port))
        # -e: nginx opens its compiled-in error log before reading the config; point that at the temp dir too.
        argv = [nginx, "-p", str(procs.logdir), "-c", str(conf), "-e", str(procs.logdir / "nginx-error.log")]
        label = f"{nginx_version(nginx)} (1 worker)"
    else:
        argv = [sys.executable, str(HERE / "fast_upstream.py"), str(port)]
        label = "aiohttp" + ("+uvloop" if importlib.util.find_spec("uvloop") else "") + " (1 process)"
    proc = procs.start_server("upstream", Pinning.prefix(pin.load_cpu) + argv)
    wait_ready(f"http://127.0.0.1:{port}/", proc, "upstream", procs.log_path("upstream"))
    return label


def sidecar_config(port: int, admin_port: int, upstream_port: int, args: argparse.Namespace) -> str:
    # --retries on leaves the route's retry policy at the built-in defaults (attempts 2); off sets attempts 1,
    # which the sidecar treats as a passthrough.
    retries = "" if args.retries == "on" else "    retries: {attempts: 1}\n"
    return f"""listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
log: {{access: {"true" if args.access_log == "on" else "false"}}}
shutdown: {SHUTDOWN_CONFIG}
upstreams:
  up: {{endpoints: [http://127.0.0.1:{upstream_port}]}}
routes:
  - name: bench
    match: {{path_prefix: /}}
    upstream: up
{retries}"""


def start_sidecar(
    procs: Processes, port: int, admin_port: int, upstream_port: int, args: argparse.Namespace, pin: Pinning
) -> subprocess.Popen[bytes]:
    """Start the sidecar and wait for /readyz (and, with workers, until every worker listens). taskset execs,
    so the child's pid is the sidecar's own (with --workers, the supervisor's; the workers are its children
    and inherit its CPU affinity). The access log (stdout) goes to a file of its own, so writing it costs
    what writing a container's stdout to disk costs, not a terminal's, and the process log stays readable."""
    config = procs.logdir / "sidecar.yaml"
    config.write_text(sidecar_config(port, admin_port, upstream_port, args))
    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(config), "--loop", args.loop]
    if args.workers > 1:
        argv += ["--workers", str(args.workers)]
    proc = procs.start_server("sidecar", Pinning.prefix(pin.sidecar_cpus) + argv, stdout=access_log_path(procs))
    log = procs.log_path("sidecar")
    wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc, "sidecar", log)
    # /readyz answers from whichever worker accepts the connection: wait until all N have bound the port.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while args.workers > 1 and listening_sockets(port) < args.workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            listening = listening_sockets(port)
            raise BenchError(f"only {listening} of {args.workers} sidecar workers listen on {port}:\n{log_tail(log)}")
        time.sleep(0.05)
    return proc


def start_naive(
    procs: Processes, port: int, upstream_port: int, args: argparse.Namespace, pin: Pinning
) -> subprocess.Popen[bytes]:
    """Start naive_proxy.py, the reference baseline, pinned exactly like the sidecar and on the same loop. It has
    no admin port: ready when a request through it gets the upstream's 200."""
    argv = [sys.executable, str(HERE / "naive_proxy.py"), str(port), f"http://127.0.0.1:{upstream_port}",
            "--loop", args.loop]
    proc = procs.start_server("naive", Pinning.prefix(pin.sidecar_cpus) + argv)
    wait_ready(f"http://127.0.0.1:{port}/", proc, "naive proxy", procs.log_path("naive"))
    return proc


def access_log_path(procs: Processes) -> Path:
    return procs.logdir / "sidecar-access.log"


def access_log_lines(procs: Processes) -> int:
    path = access_log_path(procs)
    if not path.exists():
        return 0
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def code_version() -> str:
    """The commit the sidecar runs from, and whether sidecar/ has uncommitted edits: with an editable install,
    whatever is on disk when the sidecar starts is what gets measured."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "sidecar"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit}{' + uncommitted edits in sidecar/' if dirty else ''}"


def sidecar_log_problems(log: Path, limit: int = 10) -> list[str]:
    """Warnings, errors and tracebacks the sidecar logged: under load there should be none."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    bad = [line for line in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line)]
    return bad[:limit]


# --- load generators -------------------------------------------------------------------------------------


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

    def _pyload(self, *args: str) -> list[str]:
        return [sys.executable, str(HERE / "pyload.py"), *args]

    def _run(self, argv: list[str], duration: int) -> str:
        return self.procs.run_tool(Pinning.prefix(self.pin.load_cpu) + argv, timeout=duration + TOOL_GRACE_S)


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """All measurements of one target (the upstream directly, or through the sidecar)."""

    throughput: Result
    latency: Result
    cpu_us_per_request: float = math.nan
    cpu_busy_pct: float = math.nan  # share of one core during the throughput run: ~100 means CPU-bound
    rss_mib: float = math.nan
    processes: int = 0  # sidecar processes whose CPU and RSS are summed: 1, or a supervisor + its workers
    # With workers: each process's share of one core during the throughput run, supervisor first.
    busy_pct_by_pid: dict[int, float] = field(default_factory=dict)
    # Busy time during the throughput run not spent by the sidecar, % of 1 core. On the sidecar's CPUs: the
    # load side when they share a core, else something competing with the sidecar. On all CPUs: wrk and the
    # upstream (about 20% of a core at 6k req/s) plus anything else running, e.g. a test suite.
    others_busy_pct: float = math.nan
    machine_others_busy_pct: float = math.nan


def measure(
    name: str, url: str, load: LoadGen, args: argparse.Namespace, pid: int | None = None, pin: Pinning | None = None
) -> Target:
    """Warm-up, throughput at --connections (sampling the CPU of `pid` and its children around it), then
    latency at --rate."""
    if args.warmup > 0:
        # Opens the keep-alive connections and warms caches, so neither counts against the measured run.
        progress(f"{name}: warm-up {args.warmup}s")
        load.throughput(url, args.connections, args.warmup)
    progress(f"{name}: throughput, {args.connections} connections, {args.duration}s ({load.throughput_tool})")
    cpus = pin.sidecar_cpus if pin else None
    wall_before, cores_before, all_before = time.monotonic(), cpus_busy_seconds(cpus), cpus_busy_seconds(None)
    cpu_before = cpu_seconds_by_pid(pid) if pid else {}
    throughput = load.throughput(url, args.connections, args.duration)
    cpu_after = cpu_seconds_by_pid(pid) if pid else {}
    wall, cores_busy = time.monotonic() - wall_before, cpus_busy_seconds(cpus) - cores_before
    all_busy = cpus_busy_seconds(None) - all_before
    progress(f"{name}: {throughput.rps:,.0f} req/s")
    progress(f"{name}: latency at {args.rate:g} req/s, {args.duration}s ({load.latency_tool})")
    latency = load.latency(url, args.rate, args.duration, args.connections, args.hey_workers)
    progress(f"{name}: p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms")
    target = Target(throughput, latency)
    if pid:
        # Summed over the tree, so a worker restarted mid-run still counts (see cpu_seconds_by_pid).
        cpu_used = sum(cpu_after.values()) - sum(cpu_before.values())
        seconds = throughput.seconds or math.nan
        target.cpu_us_per_request = cpu_used / throughput.requests * 1e6 if throughput.requests else math.nan
        target.cpu_busy_pct = cpu_used / seconds * 100
        target.rss_mib, target.processes = rss_mib(pid)
        target.others_busy_pct = max(0.0, cores_busy - cpu_used) / wall * 100
        target.machine_others_busy_pct = max(0.0, all_busy - cpu_used) / wall * 100
        if len(cpu_after) > 1:
            target.busy_pct_by_pid = {p: (cpu_after[p] - cpu_before.get(p, 0.0)) / seconds * 100 for p in cpu_after}
    return target


@dataclass(frozen=True)
class Servers:
    upstream_label: str
    direct_url: str
    sidecar_url: str
    sidecar: subprocess.Popen[bytes]
    pin: Pinning
    naive_url: str | None = None
    naive: subprocess.Popen[bytes] | None = None


def start_servers(args: argparse.Namespace, procs: Processes, pin: Pinning) -> Servers:
    upstream_port, sidecar_port, admin_port, naive_port = free_ports(4)
    progress(f"starting upstream on 127.0.0.1:{upstream_port}")
    label = start_upstream(args.upstream, procs, upstream_port, pin)
    direct_url = f"http://127.0.0.1:{upstream_port}/"
    check_response(direct_url, "upstream")
    # Started before the direct run, so that a broken sidecar fails the bench in seconds, not after a full run.
    progress(f"starting sidecar on 127.0.0.1:{sidecar_port} (loop {args.loop}), waiting for /readyz")
    sidecar = start_sidecar(procs, sidecar_port, admin_port, upstream_port, args, pin)
    sidecar_url = f"http://127.0.0.1:{sidecar_port}/"
    check_response(sidecar_url, "sidecar")
    if args.baseline == "none":
        return Servers(label, direct_url, sidecar_url, sidecar, pin)
    progress(f"starting naive proxy on 127.0.0.1:{naive_port} (loop {args.loop})")
    naive = start_naive(procs, naive_port, upstream_port, args, pin)
    naive_url = f"http://127.0.0.1:{naive_port}/"
    check_response(naive_url, "naive proxy")
    return Servers(label, direct_url, sidecar_url, sidecar, pin, naive_url, naive)


def measure_proxy(
    name: str, url: str, proc: subprocess.Popen[bytes], load: LoadGen, args: argparse.Namespace, procs: Processes,
    pin: Pinning,
) -> Target:
    """measure() with the CPU of `proc`'s tree. Both proxies idle on the same CPUs while the other is measured."""
    try:
        return measure(name, url, load, args, proc.pid, pin)
    except BenchError as exc:
        if proc.poll() is None:
            raise
        # The load generator's complaint ("connection refused") hides the real news: the proxy died.
        code, log = proc.returncode, log_tail(procs.log_path(name))
        raise BenchError(f"the {name} proxy exited with {code} under load ({exc}); its log:\n{log}") from exc


def run(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    busy = machine_busy_pct()
    if busy > BUSY_WARN_PCT:
        progress(f"WARNING: the machine is already {busy:.0f}% busy before the bench starts: numbers will be noisy")
    pin = Pinning.detect(not args.no_pin, args.workers, args.sidecar_cpus)
    load = LoadGen.choose(args.loadgen, procs, pin)
    servers = start_servers(args, procs, pin)
    direct = measure("direct", servers.direct_url, load, args, None)
    through_sidecar = measure_proxy("sidecar", servers.sidecar_url, servers.sidecar, load, args, procs, pin)
    naive = None
    if servers.naive is not None and servers.naive_url is not None:
        naive = measure_proxy("naive", servers.naive_url, servers.naive, load, args, procs, pin)
    notes = pin.notes(args.workers)
    if naive is not None and args.workers > 1:
        notes.append(f"the naive proxy is 1 process on the sidecar's CPUs ({args.workers} sidecar workers)")
    return {
        "config": {
            "duration_s": args.duration, "warmup_s": args.warmup, "rate": args.rate,
            "connections": args.connections, "hey_workers": args.hey_workers, "loop": args.loop,
            "upstream": servers.upstream_label,
            "throughput_tool": load.throughput_tool, "latency_tool": load.latency_tool,
            "pinning": pin.describe(), "pinning_notes": notes, "baseline": args.baseline,
            "sidecar_cpus_to_itself": pin.sidecar_alone,
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "machine_busy_before_pct": busy,
            "access_log": args.access_log, "retries": args.retries, "workers": args.workers,
            "sidecar_config": (procs.logdir / "sidecar.yaml").read_text(), "code": code_version(),
        },
        "direct": direct,
        "sidecar": through_sidecar,
        "naive": naive,
        "naive_alive": servers.naive is None or servers.naive.poll() is None,
        "naive_log_problems": sidecar_log_problems(procs.log_path("naive")),
        # poll(), not /proc/<pid>: a dead child we have not reaped yet still has a /proc entry (a zombie).
        "sidecar_alive": servers.sidecar.poll() is None,
        "sidecar_workers_alive": len(children(servers.sidecar.pid)) if args.workers > 1 else 1,
        "access_log_lines": access_log_lines(procs),
        "sidecar_log_problems": sidecar_log_problems(procs.log_path("sidecar")),
    }


# --- output ----------------------------------------------------------------------------------------------


def ratio(sidecar: float, direct: float) -> float:
    if math.isnan(sidecar) or math.isnan(direct) or direct == 0:
        return math.nan
    return sidecar / direct


@dataclass(frozen=True)
class Row:
    label: str
    direct: float
    sidecar: float
    naive: float
    ratio_key: str | None = None  # set on the rows where a ratio means something; the JSON key
    vs_naive: bool = False  # sidecar/naive is shown for the proxy-only rows (CPU, RSS), which have no direct


def rows(report: dict[str, Any]) -> list[Row]:
    nan = math.nan
    d: Target = report["direct"]
    s: Target = report["sidecar"]
    # Without a baseline, an all-NaN stand-in so each row reads the same way; the table drops its columns.
    n: Target = report["naive"] or Target(Result("-", 0, nan, nan, 0, 0), Result("-", 0, nan, nan, 0, 0))
    conns, rate = report["config"]["connections"], report["config"]["rate"]
    rss = "proxy RSS after run, MiB" if s.processes < 2 else f"proxy RSS, MiB (sidecar: sum of {s.processes} procs)"
    return [
        Row(f"throughput, req/s ({conns} conns)", d.throughput.rps, s.throughput.rps, n.throughput.rps,
            "throughput_rps"),
        Row("  non-2xx responses", d.throughput.non_2xx, s.throughput.non_2xx, n.throughput.non_2xx),
        Row("  failed requests (no response)", d.throughput.errors, s.throughput.errors, n.throughput.errors),
        Row(f"latency p50, ms (@{rate:g} req/s)", d.latency.p50_ms, s.latency.p50_ms, n.latency.p50_ms,
            "latency_p50_ms"),
        Row(f"latency p99, ms (@{rate:g} req/s)", d.latency.p99_ms, s.latency.p99_ms, n.latency.p99_ms,
            "latency_p99_ms"),
        Row("  achieved rate, req/s", d.latency.rps, s.latency.rps, n.latency.rps),
        Row("  non-2xx responses", d.latency.non_2xx, s.latency.non_2xx, n.latency.non_2xx),
        Row("  failed requests (no response)", d.latency.errors, s.latency.errors, n.latency.errors),
        Row("proxy CPU per request, us", nan, s.cpu_us_per_request, n.cpu_us_per_request, "cpu_us_per_request",
            vs_naive=True),
        Row("proxy CPU busy, % of 1 core", nan, s.cpu_busy_pct, n.cpu_busy_pct),
        Row(rss, nan, s.rss_mib, n.rss_mib, "rss_mib", vs_naive=True),
    ]


def fmt(value: float) -> str:
    if isinstance(value, int):  # a count
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"  # big rates: no fake precision


def latency_tool(report: dict[str, Any]) -> str:
    tool: str = report["direct"].latency.tool
    # The arrival pattern moves p50 a lot (see LoadGen.latency), so the table says which one was used.
    if tool == "hey":
        return f"hey ({report['config']['hey_workers']} workers, arrivals in bursts)"
    return f"{tool} (evenly spaced arrivals)"


def sidecar_setup(cfg: dict[str, Any]) -> str:
    workers = "1 process" if cfg["workers"] == 1 else f"{cfg['workers']} workers + supervisor"
    access = "on (JSON lines to a file)" if cfg["access_log"] == "on" else "off (the numbers are the proxy alone)"
    retries = "on (route defaults: attempts 2)" if cfg["retries"] == "on" else "off (attempts 1)"
    return f"sidecar {cfg['code']}: {workers}, loop {cfg['loop']}; access log {access}; retries {retries}"


def footer(report: dict[str, Any]) -> list[str]:
    s: Target = report["sidecar"]
    n: Target | None = report["naive"]
    lines = []
    if n is not None:
        lines.append("naive = bench/naive_proxy.py (plain aiohttp proxy, no policies), pinned like the sidecar and "
                     "measured after it")
    if s.processes > 1:
        shares = ", ".join(f"{'supervisor' if i == 0 else 'worker'} {busy:.0f}%"
                           for i, busy in enumerate(s.busy_pct_by_pid.values()))
        lines.append(f"sidecar CPU and RSS are summed over {s.processes} processes; "
                     f"busy during the throughput run (% of 1 core): {shares}")
    on_its_cpus = f"{s.others_busy_pct:.0f}% on the sidecar's CPUs, " if report["config"]["pinning"] != "none" else ""
    lines.append(f"CPU used by other processes during the sidecar's throughput run, % of 1 core: {on_its_cpus}"
                 f"{s.machine_others_busy_pct:.0f}% on all CPUs (wrk and the upstream included)")
    if n is not None:
        on_its_cpus = f"{n.others_busy_pct:.0f}% on its CPUs, " if report["config"]["pinning"] != "none" else ""
        lines.append(f"  same during the naive proxy's run: {on_its_cpus}{n.machine_others_busy_pct:.0f}% on all CPUs")
    lines.append(f"sidecar access log: {report['access_log_lines']:,} lines written")
    return lines


def table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"upstream: {cfg['upstream']}; pinning: {cfg['pinning']}",
        sidecar_setup(cfg),
        f"load: throughput by {report['direct'].throughput.tool}, latency by {latency_tool(report)}; "
        f"{cfg['duration_s']}s per measurement after {cfg['warmup_s']}s warm-up; python {cfg['python']}; "
        f"machine {cfg['machine_busy_before_pct']:.0f}% busy before start",
        *(f"note: {note}" for note in cfg["pinning_notes"]),
        "",
    ]
    naive = report["naive"] is not None
    width = 44
    head = f"{'metric':<{width}} {'direct':>10} {'sidecar':>10}"
    head += f" {'naive':>10} {'sidecar/direct':>15} {'sidecar/naive':>14}" if naive else f" {'sidecar/direct':>15}"
    lines += [head, "-" * len(head)]
    for row in rows(report):
        vs_direct = fmt(ratio(row.sidecar, row.direct)) if row.ratio_key and not row.vs_naive else ""
        line = f"{row.label:<{width}} {fmt(row.direct):>10} {fmt(row.sidecar):>10}"
        if naive:
            vs_naive = fmt(ratio(row.sidecar, row.naive)) if row.ratio_key else ""
            line += f" {fmt(row.naive):>10} {vs_direct:>15} {vs_naive:>14}"
        else:
            line += f" {vs_direct:>15}"
        lines.append(line.rstrip())
    return "\n".join(lines + footer(report))


def to_json(report: dict[str, Any]) -> str:
    def clean(value: Any) -> Any:
        # NaN is not JSON: say "not measured" as null.
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = {k: asdict(v) if isinstance(v, Target) else v for k, v in report.items()}
    data["ratios"] = {row.ratio_key: ratio(row.sidecar, row.direct) for row in rows(report)
                      if row.ratio_key and not row.vs_naive}
    if report["naive"] is not None:
        data["ratios_vs_naive"] = {row.ratio_key: ratio(row.sidecar, row.naive)
                                   for row in rows(report) if row.ratio_key}
    return json.dumps(clean(data), indent=2)


def failures(report: dict[str, Any]) -> list[str]:
    """Everything that makes the numbers suspect: failed or non-2xx requests, a dead or complaining sidecar."""
    found = []
    for name in ("direct", "sidecar", "naive"):
        target: Target | None = report[name]
        if target is None:
            continue
        for phase, result in (("throughput", target.throughput), ("latency", target.latency)):
            if result.non_2xx or result.errors:
                found.append(f"{name} {phase}: {result.non_2xx} non-2xx responses, {result.errors} failed requests")
    if not report["sidecar_alive"]:
        found.append("the sidecar process died during the run")
    elif report["sidecar_workers_alive"] != report["config"]["workers"]:
        found.append(f"{report['sidecar_workers_alive']} of {report['config']['workers']} sidecar workers alive")
    found.extend(f"sidecar log: {line}" for line in report["sidecar_log_problems"])
    if not report["naive_alive"]:
        found.append("the naive proxy died during the run")
    found.extend(f"naive proxy log: {line}" for line in report["naive_log_problems"])
    return found


# --- main ------------------------------------------------------------------------------------------------


def bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a fast upstream directly and through the sidecar.")
    parser.add_argument("--duration", type=bounded(int, 1, MAX_DURATION_S), default=10,
                        help="seconds per measurement (whole seconds: wrk takes no fractions; default 10)")
    parser.add_argument("--warmup", type=bounded(int, 0, 60), default=1, help="warm-up seconds per target (1)")
    parser.add_argument("--rate", type=bounded(float, 1, MAX_RATE), default=1000.0,
                        help="requests/s for the latency measurement (1000)")
    parser.add_argument("--connections", type=bounded(int, 1, MAX_CONNECTIONS), default=64,
                        help="keep-alive connections for the throughput measurement (64)")
    parser.add_argument("--hey-workers", type=bounded(int, 1, 100), default=10,
                        help="hey workers for the latency run, each at rate/N req/s (10)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="sidecar event loop")
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto",
                        help="auto: nginx if installed, else a minimal aiohttp server")
    parser.add_argument("--loadgen", choices=("auto", "python"), default="auto",
                        help="auto: wrk/hey where installed, else the aiohttp client in bench/pyload.py")
    parser.add_argument("--access-log", choices=("on", "off"), default="off",
                        help="the sidecar's access log (log.access), written to a file (default off)")
    parser.add_argument("--retries", choices=("on", "off"), default="on",
                        help="on: the route's default retry policy (attempts 2); off: attempts 1 (default on)")
    parser.add_argument("--workers", type=bounded(int, 1, MAX_WORKERS), default=1,
                        help="sidecar worker processes, `sidecar run --workers N` (1)")
    parser.add_argument("--sidecar-cpus", type=cpu_list_arg, default=None, metavar="LIST",
                        help="taskset CPU list for the sidecar, e.g. 0,1 (default: CPU 1 for 1 worker, else every "
                             "CPU but the load generator's)")
    parser.add_argument("--baseline", choices=("none", "naive"), default="naive",
                        help="naive: also measure bench/naive_proxy.py, pinned like the sidecar (default naive)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.no_pin and args.sidecar_cpus is not None:
        parser.error("--sidecar-cpus pins the sidecar; it cannot go with --no-pin")
    return args


def cpu_list_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the `with` blocks, so children are killed as on Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("bench: --loop uvloop but uvloop is not installed (pip install -e '.[uvloop]')", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp, Processes(Path(tmp), REPO) as procs:
        try:
            report = run(args, procs)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # The `with` still kills the children and removes the temp dir on the way out.
            print("bench: interrupted", file=sys.stderr)
            return 130
    print(to_json(report) if args.json else table(report))
    problems = failures(report)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    for name in ("sidecar", "naive"):
        others = report[name].others_busy_pct if report[name] else 0.0
        if report["config"]["sidecar_cpus_to_itself"] and others > BUSY_WARN_PCT:
            print(f"WARNING: other processes used {others:.0f}% of a core on the {name} proxy's CPUs during its run",
                  file=sys.stderr)
    if report["config"]["machine_busy_before_pct"] > BUSY_WARN_PCT:
        # Noisy, not wrong: a warning, but it does not change the exit status.
        print(f"WARNING: machine was {report['config']['machine_busy_before_pct']:.0f}% busy before the start",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
