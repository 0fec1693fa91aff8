"""Benchmark the sidecar: one fast upstream, measured directly, through the sidecar, through a naive aiohttp
proxy and through nginx and HAProxy as proxy peers, in interleaved rounds; prints a markdown table of medians.

    python bench/bench.py [--duration 5] [--rounds 3] [--warmup 1] [--rate 1000] [--connections 64]
                          [--hey-workers 10] [--loop asyncio|uvloop] [--upstream auto|nginx|aiohttp]
                          [--loadgen auto|python] [--access-log on|off] [--retries on|off] [--workers N]
                          [--sidecar-cpus LIST] [--baseline none|naive] [--peers auto|none|nginx,haproxy]
                          [--body-size BYTES] [--idle-connections N] [--scaling] [--no-pin] [--json]

Everything listens on 127.0.0.1 only, every phase is bounded in time, and every child process is killed on the
way out (normal exit, exception, Ctrl-C, SIGTERM). Progress goes to stderr; the table (or JSON) to stdout.
Exit status: 0 when every request got a 2xx, 1 when some did not (the table is still printed), 2 on setup errors.
The modules: servers.py and peers.py start the targets, loadgen.py runs wrk/hey, measure.py and idle.py
measure, report.py aggregates and prints, procs.py owns the child processes and reads /proc.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from idle import measure_idle, raise_fd_limit
from loadgen import LoadGen
from measure import measure
from peers import choose_peers, peers_arg, start_peer
from procs import BenchError, Pinning, Processes, children, machine_busy_pct, parse_cpu_list, rss_mib
from report import Report, TargetReport, failures, markdown, to_json
from servers import (
    REPO,
    Server,
    access_log_lines,
    code_version,
    free_ports,
    image_environment,
    log_problems,
    progress,
    start_naive,
    start_sidecar,
    start_upstream,
)

# Bounds on the options, so a typo cannot start an hour-long or machine-melting run.
MAX_DURATION_S = 600
MAX_ROUNDS = 20
MAX_RATE = 100_000
MAX_CONNECTIONS = 1024
MAX_WORKERS = 32
MAX_BODY = 8 * 1024 * 1024
MAX_IDLE_CONNECTIONS = 10_000  # the sidecar's default server.listen_max_connections
# Above this share of CPU in use by others before the start, the results are flagged as noisy.
BUSY_WARN_PCT = 10.0


# --- the run ---------------------------------------------------------------------------------------------


def start_servers(args: argparse.Namespace, procs: Processes, pin: Pinning, peers: list[str]) -> list[Server]:
    """Every target, direct first. The proxies start before any measurement, so that a broken one fails the
    bench in seconds, not after a full round; they all stay up the whole run, each idle while the others are
    measured."""
    (upstream_port,) = free_ports(1)
    progress(f"starting upstream on 127.0.0.1:{upstream_port} ({args.body_size:,}-byte responses)")
    servers = [start_upstream(args.upstream, procs, upstream_port, pin, args.body_size)]
    servers.append(start_sidecar("sidecar", args.workers, procs, upstream_port, args, pin))
    if args.scaling:
        servers.append(start_sidecar("sidecar-2w", 2, procs, upstream_port, args, pin))
    if args.baseline == "naive":
        servers.append(start_naive(procs, upstream_port, args, pin))
    servers += [start_peer(name, procs, upstream_port, args, pin) for name in peers]
    return servers


def rotated(servers: list[Server], round_index: int) -> list[Server]:
    """Round r starts at target r: over the rounds each target takes each slot, so a drift over time (a
    neighbour on the host, thermal state) does not always land on the same target."""
    shift = round_index % len(servers)
    return servers[shift:] + servers[:shift]


def pinning(args: argparse.Namespace) -> Pinning:
    override = args.sidecar_cpus
    cpus = sorted(os.sched_getaffinity(0))
    if args.scaling and override is None and not args.no_pin and shutil.which("taskset") and len(cpus) >= 2:
        # Both sidecars (1 and 2 workers) get every CPU, the load side's included: the only fair way to let
        # two workers use two cores on a machine whose load generator needs one of them too.
        override = tuple(cpus)
    return Pinning.detect(not args.no_pin, 2 if args.scaling else args.workers, override)


def machine() -> dict[str, object]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu_model": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0], "aiohttp": importlib.metadata.version("aiohttp")}


def notes(args: argparse.Namespace, pin: Pinning, skipped: list[str]) -> list[str]:
    found = pin.notes(args.workers)
    if args.scaling:
        found += [n for n in pin.notes(2) if n not in found]
        found.append("--scaling: on a 2-core machine the load generator and the upstream share the cores with the "
                     "sidecar, so 2 workers cannot reach 2x; the ratio shows how much of the contended second core "
                     "a second worker turns into throughput")
    if args.baseline == "naive" and args.workers > 1:
        found.append(f"the naive proxy is 1 process on the sidecar's CPUs ({args.workers} sidecar workers)")
    return found + skipped


def sidecar_setup(args: argparse.Namespace) -> str:
    access = "on (JSON lines to a file)" if args.access_log == "on" else "off"
    retries = "on (route defaults: attempts 2)" if args.retries == "on" else "off (attempts 1)"
    malloc = image_environment().get("GLIBC_TUNABLES", "glibc defaults")
    return f"sidecar: loop {args.loop}; access log {access}; retries {retries}; Python proxies' malloc: {malloc}"


def run(args: argparse.Namespace, procs: Processes) -> Report:
    busy = machine_busy_pct()
    if busy > BUSY_WARN_PCT:
        progress(f"WARNING: the machine is already {busy:.0f}% busy before the bench starts: numbers will be noisy")
    peers, skipped = choose_peers(args.peers)
    for notice in skipped:
        progress(notice)
    pin = pinning(args)
    if pin.load_cpu is not None:
        # The bench's own work (RSS sampling, the idle-connection client) stays on the load side's core.
        os.sched_setaffinity(0, {pin.load_cpu})
    load = LoadGen.choose(args.loadgen, procs, pin)
    code = code_version()  # what the sidecar starts from: with an editable install, whatever is on disk now
    servers = start_servers(args, procs, pin, peers)
    targets = {s.name: TargetReport(s.name, s.label, processes_expected=s.processes) for s in servers}
    for server in servers:
        if server.proc is not None:
            targets[server.name].rss_idle_mib = rss_mib(server.proc.pid)[0]
    for r in range(args.rounds):
        order = rotated(servers, r)
        progress(f"round {r + 1} of {args.rounds}: {', '.join(s.name for s in order)}")
        for server in order:
            targets[server.name].samples.append(measure(server, load, args, pin))
    for server in servers:
        if args.idle_connections and server.proc is not None:
            targets[server.name].idle = measure_idle(server, args.idle_connections)
    for server in servers:
        target = targets[server.name]
        if server.proc is not None:
            # poll(), not /proc/<pid>: a dead child we have not reaped yet still has a /proc entry (a zombie).
            target.alive = server.proc.poll() is None
            target.processes_alive = len(children(server.proc.pid)) if server.processes > 1 else 1
        target.log_problems = log_problems(server)
    config = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "code": code, "rounds": args.rounds,
        "duration_s": args.duration, "warmup_s": args.warmup, "rate": args.rate, "connections": args.connections,
        "hey_workers": args.hey_workers, "body_size": args.body_size, "idle_connections": args.idle_connections,
        "loop": args.loop, "access_log": args.access_log, "retries": args.retries, "workers": args.workers,
        "scaling": args.scaling, "baseline": args.baseline, "peers": peers,
        "upstream": servers[0].label, "pinning": pin.describe(), "sidecar_cpus_to_itself": pin.sidecar_alone,
        "throughput_tool": "wrk -t1" if load.throughput_tool == "wrk" else "pyload.py",
        "latency_tool": load.describe_latency(args.hey_workers),
        "sidecar_setup": sidecar_setup(args), "machine_busy_before_pct": busy,
        "sidecar_config": (procs.logdir / "sidecar.yaml").read_text(),
    }
    return Report(config, machine(), targets, notes(args, pin, skipped), access_log_lines(procs, "sidecar"))


# --- main ------------------------------------------------------------------------------------------------


def bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def cpu_list_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark a fast upstream directly, through the sidecar and through "
                                "reference proxies, in interleaved rounds.")
    p.add_argument("--duration", type=bounded(int, 1, MAX_DURATION_S), default=5,
                   help="seconds per measurement (whole seconds: wrk takes no fractions; default 5)")
    p.add_argument("--rounds", type=bounded(int, 1, MAX_ROUNDS), default=3,
                   help="rounds; each measures every target once, and the table shows medians (3)")
    p.add_argument("--warmup", type=bounded(int, 0, 60), default=1, help="warm-up seconds per target and round (1)")
    p.add_argument("--rate", type=bounded(float, 1, MAX_RATE), default=1000.0,
                   help="requests/s for the latency measurement (1000)")
    p.add_argument("--connections", type=bounded(int, 1, MAX_CONNECTIONS), default=64,
                   help="keep-alive connections for the throughput measurement (64)")
    p.add_argument("--hey-workers", type=bounded(int, 1, 100), default=10,
                   help="hey workers for the latency run, each at rate/N req/s (10)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="sidecar event loop")
    p.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto",
                   help="auto: nginx if installed, else a minimal aiohttp server")
    p.add_argument("--loadgen", choices=("auto", "python"), default="auto",
                   help="auto: wrk/hey where installed, else the aiohttp client in bench/pyload.py")
    p.add_argument("--body-size", type=bounded(int, 0, MAX_BODY), default=1024, metavar="BYTES",
                   help="response body size of the upstream (1024)")
    p.add_argument("--access-log", choices=("on", "off"), default="off",
                   help="the sidecar's access log (log.access), written to a file (default off)")
    p.add_argument("--retries", choices=("on", "off"), default="on",
                   help="on: the route's default retry policy (attempts 2); off: attempts 1 (default on)")
    p.add_argument("--workers", type=bounded(int, 1, MAX_WORKERS), default=1,
                   help="sidecar worker processes, `sidecar run --workers N` (1)")
    p.add_argument("--sidecar-cpus", type=cpu_list_arg, default=None, metavar="LIST",
                   help="taskset CPU list for the proxies, e.g. 0,1 (default: CPU 1 for 1 worker, else every "
                        "CPU but the load generator's; with --scaling, every CPU)")
    p.add_argument("--scaling", action="store_true",
                   help="also measure the sidecar with 2 workers on the same CPUs, and report 2 workers / 1")
    p.add_argument("--baseline", choices=("none", "naive"), default="naive",
                   help="naive: also measure bench/naive_proxy.py, pinned like the sidecar (default naive)")
    p.add_argument("--peers", type=peers_arg, default=None, metavar="auto|none|nginx,haproxy",
                   help="proxy peers to measure; auto: those installed, with a notice for the others (auto)")
    p.add_argument("--idle-connections", type=bounded(int, 0, MAX_IDLE_CONNECTIONS), default=0, metavar="N",
                   help="after the rounds, hold N idle keep-alive connections to each proxy and report its RSS (0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if args.no_pin and args.sidecar_cpus is not None:
        p.error("--sidecar-cpus pins the proxies; it cannot go with --no-pin")
    if args.scaling and args.workers != 1:
        p.error("--scaling compares 1 and 2 workers; leave --workers at 1")
    return args


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
            raise_fd_limit(args.idle_connections)  # before any server starts: they inherit it
            report = run(args, procs)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # The `with` still kills the children and removes the temp dir on the way out.
            print("bench: interrupted", file=sys.stderr)
            return 130
    print(to_json(report) if args.json else markdown(report))
    problems = failures(report)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    if report.config["sidecar_cpus_to_itself"]:
        for target in report.targets.values():
            others = max((s.others_busy_pct for s in target.samples if not math.isnan(s.others_busy_pct)),
                         default=0.0)
            if others > BUSY_WARN_PCT:
                print(f"WARNING: other processes used up to {others:.0f}% of a core on {target.name}'s CPUs during "
                      "its throughput runs", file=sys.stderr)
    if report.config["machine_busy_before_pct"] > BUSY_WARN_PCT:
        # Noisy, not wrong: a warning, but it does not change the exit status.
        print(f"WARNING: machine was {report.config['machine_busy_before_pct']:.0f}% busy before the start",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
