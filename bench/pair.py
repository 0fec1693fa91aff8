"""Compare this checkout's sidecar with another's, both on one core at the same time.

    git worktree add /tmp/base <commit>
    python bench/pair.py /tmp/base [--rounds 6] [--duration 6] [--connections 64]

For changes worth a few percent, on a machine whose speed drifts by more than that from minute to
minute (a shared VM): bench.py measures its targets one after another, so a drift between two of them
looks like a difference. Here both sidecars run at once, pinned to the same core, each under its own
wrk with half the connections: whatever slows the core slows both. Each round prints the CPU per
request of each and their ratio; the median ratio is the answer. A checkout against itself gave
0.98-1.01 per round on our 2-vCPU VM. The absolute figures are higher than bench.py's (two processes
take turns on one core and its caches): read the ratio. The config is bench.py's (nginx upstream,
1 KiB bodies, retries on, access log off). Only loopback; every child is killed on the way out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadgen import LoadGen, Result
from procs import BenchError, Pinning, Processes, cpu_seconds_by_pid
from servers import REPO, Server, free_ports, progress, start_sidecar, start_upstream

MAX_ROUNDS = 20
MAX_DURATION_S = 60
WARMUP_S = 2


def checkout_arg(text: str) -> Path:
    path = Path(text).resolve()
    if not (path / "sidecar" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} holds no sidecar/ package (git worktree add {path} <commit>)")
    return path


def imported_from(checkout: Path) -> Path:
    """Where `python -m sidecar` started in `checkout` imports the package from: the checkout itself, or the
    comparison would be of one tree with itself."""
    out = subprocess.run([sys.executable, "-c", "import sidecar; print(sidecar.__file__)"], cwd=checkout,
                         capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    return Path(out).resolve().parent.parent


def cpu_seconds(server: Server) -> float:
    assert server.proc is not None
    return sum(cpu_seconds_by_pid(server.proc.pid).values())


def both_under_load(load: LoadGen, servers: tuple[Server, Server], connections: int, duration: int) -> list[Result]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda server: load.throughput(server.url, connections, duration), servers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=checkout_arg, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=6, choices=range(1, MAX_ROUNDS + 1), metavar="N")
    parser.add_argument("--duration", type=int, default=6, choices=range(1, MAX_DURATION_S + 1), metavar="S",
                        help="seconds per round (6)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections, split between the two (64)")
    args = parser.parse_args()
    for checkout in (REPO, args.other):
        if imported_from(checkout) != checkout:
            raise BenchError(f"python -m sidecar in {checkout} imports {imported_from(checkout)}")
    pin = Pinning.detect(True, 1, None)
    if pin.sidecar_cpus is None:
        raise BenchError("pair.py needs 2 CPUs and taskset: one for the load, one shared by the two sidecars")
    # What start_sidecar reads from bench.py's options: its defaults.
    config = argparse.Namespace(access_log="off", retries="on", loop="asyncio", body_size=1024)
    with tempfile.TemporaryDirectory(prefix="sidecar-pair-") as tmp, Processes(Path(tmp), REPO) as procs:
        (upstream_port,) = free_ports(1)
        start_upstream("auto", procs, upstream_port, pin, config.body_size)
        this = start_sidecar("this", 1, procs, upstream_port, config, pin)
        other = start_sidecar("other", 1, procs, upstream_port, config, pin, checkout=args.other)
        load = LoadGen.choose("auto", procs, pin)
        half = max(1, args.connections // 2)
        both_under_load(load, (this, other), half, WARMUP_S)
        ratios = []
        print(f"this: {REPO}\nother: {args.other}\n\n| round | this us/req | other us/req | this / other |")
        print("|---:|---:|---:|---:|")
        for number in range(1, args.rounds + 1):
            progress(f"round {number} of {args.rounds}")
            before = cpu_seconds(this), cpu_seconds(other)
            results = both_under_load(load, (this, other), half, args.duration)
            after = cpu_seconds(this), cpu_seconds(other)
            if any(result.errors or result.non_2xx or not result.requests for result in results):
                raise BenchError(f"round {number}: some requests failed: {results}")
            spent = [end - start for start, end in zip(before, after, strict=True)]
            us = [seconds * 1e6 / result.requests for seconds, result in zip(spent, results, strict=True)]
            ratios.append(us[0] / us[1])
            print(f"| {number} | {us[0]:.1f} | {us[1]:.1f} | {ratios[-1]:.3f} |", flush=True)
        print(f"\nmedian this / other: {statistics.median(ratios):.3f} (CPU per request; below 1: this is cheaper)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"pair.py: {exc}", file=sys.stderr)
        sys.exit(2)
