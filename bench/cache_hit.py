"""CPU per request of a cache hit, a cache miss and a plain proxied request, in one sidecar in one run.

    python bench/cache_hit.py [--rounds 5] [--duration 5] [--connections 64]

Issue 18's speed promise: a fresh hit costs at most half the CPU of a proxied request (it makes no
upstream hop). Three sidecars with the same config run in front of the bench's nginx upstream (1 KiB
bodies, retries at their defaults, access log off), and each is loaded with one of the targets:

    proxied  /             a route without `cache:` (what every request cost before the cache)
    hit      /cached/      a route with `cache: {default_ttl: 1h}`: after the first request, every
                           answer is a fresh HIT from the entry
    miss     /cached/      the same route, each request sent with `Cache-Control: no-cache`: every
                           one goes upstream, is read whole and stored again (a MISS)

As in bench/pair.py, the three run at the same time, pinned to the same core, each under its
own `wrk` with a third of the connections: whatever slows the core (a shared VM drifts by more
than the differences measured here) slows all three. Each round reads each sidecar's utime+stime
from /proc before and after; the answer is the median of the per-round ratios to `proxied`. Whether a route *without*
a cache costs what it cost before the cache existed is a comparison of two commits: bench/pair.py.
Only loopback; every child is killed on the way out.
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadgen import TOOL_GRACE_S, parse_wrk
from procs import BenchError, Pinning, Processes, cpu_seconds_by_pid
from servers import (
    PYTHON_PROBLEMS,
    REPO,
    SHUTDOWN_CONFIG,
    Server,
    access_log_path,
    check_response,
    free_ports,
    image_environment,
    log_problems,
    progress,
    start_upstream,
    wait_ready,
)

MAX_ROUNDS = 20
MAX_DURATION_S = 60
WARMUP_S = 2
BODY_SIZE = 1024
# name -> (path, extra request headers)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "proxied": ("/", ()),
    "hit": ("/cached/", ()),
    "miss": ("/cached/", ("Cache-Control: no-cache",)),
}


def config(port: int, admin_port: int, upstream_port: int) -> str:
    return f"""listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
log: {{access: false}}
shutdown: {SHUTDOWN_CONFIG}
upstreams:
  up: {{endpoints: [http://127.0.0.1:{upstream_port}]}}
routes:
  - name: cached
    match: {{path_prefix: /cached/}}
    strip_prefix: true
    upstream: up
    cache: {{default_ttl: 1h}}  # nginx's `return 200` says nothing about freshness
  - name: proxied
    match: {{path_prefix: /}}
    upstream: up
"""


def start_sidecar(name: str, procs: Processes, upstream_port: int, pin: Pinning) -> Server:
    port, admin_port = free_ports(2)
    path = procs.logdir / f"{name}.yaml"
    path.write_text(config(port, admin_port, upstream_port))
    progress(f"starting sidecar {name} on 127.0.0.1:{port}, waiting for /readyz")
    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(path)]
    proc = procs.start_server(name, Pinning.prefix(pin.sidecar_cpus) + argv,
                              stdout=access_log_path(procs, name), env=image_environment(), cwd=REPO)
    log = procs.log_path(name)
    wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc, name, log)
    base = f"http://127.0.0.1:{port}"
    for path_ in ("/", "/cached/"):
        check_response(base + path_, name, BODY_SIZE)
    return Server(name, "sidecar", base, proc, log, PYTHON_PROBLEMS)


def cpu_seconds(server: Server) -> float:
    assert server.proc is not None
    return sum(cpu_seconds_by_pid(server.proc.pid).values())


def wrk(procs: Processes, pin: Pinning, url: str, headers: tuple[str, ...], connections: int,
        duration: int) -> tuple[int, float]:
    """(requests, seconds) of one wrk run; raises if any request failed or was not a 2xx."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    for header in headers:
        argv += ["-H", header]
    result = parse_wrk(procs.run_tool([*Pinning.prefix(pin.load_cpu), *argv, url], timeout=duration + TOOL_GRACE_S))
    if result.errors or result.non_2xx or not result.requests:
        raise BenchError(f"{url} {headers}: some requests failed: {result}")
    return result.requests, result.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, MAX_ROUNDS + 1), metavar="N")
    parser.add_argument("--duration", type=int, default=5, choices=range(1, MAX_DURATION_S + 1), metavar="S",
                        help="seconds per target and round (5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    args = parser.parse_args()
    pin = Pinning.detect(True, 1, None)
    if pin.sidecar_cpus is None:
        raise BenchError("cache_hit.py needs 2 CPUs and taskset: one for the load, one shared by the sidecars")
    names = list(TARGETS)
    share = max(1, args.connections // len(names))
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-hit-") as tmp, Processes(Path(tmp), REPO) as procs:
        (upstream_port,) = free_ports(1)
        upstream = start_upstream("auto", procs, upstream_port, pin, BODY_SIZE)
        compileall.compile_dir(REPO / "sidecar", quiet=1)  # bytecode as an installed sidecar has it
        sidecars = {name: start_sidecar(name, procs, upstream_port, pin) for name in names}

        def load(name: str, duration: int) -> int:
            path, headers = TARGETS[name]
            return wrk(procs, pin, sidecars[name].url + path, headers, share, duration)[0]

        def all_at_once(duration: int) -> dict[str, int]:
            with ThreadPoolExecutor(len(names)) as pool:
                return dict(zip(names, pool.map(lambda name: load(name, duration), names), strict=True))

        all_at_once(WARMUP_S)  # connections open, the entry stored, code paths warm
        us: dict[str, list[float]] = {name: [] for name in names}
        print(f"upstream: {upstream.label}; pinning: {pin.describe()}; body {BODY_SIZE} bytes; "
              f"3 sidecars at once, wrk -c{share} each, {args.duration} s per round\n")
        print("| round | proxied us/req | hit us/req | miss us/req | hit / proxied | miss / proxied |")
        print("|---:|---:|---:|---:|---:|---:|")
        for number in range(args.rounds):
            progress(f"round {number + 1} of {args.rounds}")
            before = {name: cpu_seconds(sidecars[name]) for name in names}
            requests = all_at_once(args.duration)
            for name in names:
                us[name].append((cpu_seconds(sidecars[name]) - before[name]) * 1e6 / requests[name])
            row = {name: us[name][-1] for name in names}
            print(f"| {number + 1} | {row['proxied']:.1f} | {row['hit']:.1f} | {row['miss']:.1f} | "
                  f"{row['hit'] / row['proxied']:.3f} | {row['miss'] / row['proxied']:.3f} |", flush=True)
        hit = statistics.median(h / p for h, p in zip(us["hit"], us["proxied"], strict=True))
        miss = statistics.median(m / p for m, p in zip(us["miss"], us["proxied"], strict=True))
        medians = {name: statistics.median(values) for name, values in us.items()}
        print(f"\nmedians: proxied {medians['proxied']:.1f} us/req, hit {medians['hit']:.1f}, "
              f"miss {medians['miss']:.1f}")
        print(f"median ratio hit / proxied: {hit:.3f} (issue 18 asks for at most 0.5)")
        print(f"median ratio miss / proxied: {miss:.3f} (what the cache adds to a request it cannot answer)")
        problems = [line for server in sidecars.values() for line in log_problems(server)]
        if problems:
            print("\nthe sidecars logged problems:\n" + "\n".join(problems))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"cache_hit.py: {exc}", file=sys.stderr)
        sys.exit(2)
