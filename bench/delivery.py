"""Durable delivery through HTTP: accepted writes per second (202s, on disk), then deliveries per second
once the upstream is back, and the sidecar's memory with the backlog stored.

    python bench/delivery.py [--seconds 5] [--connections 64] [--body-size 1024] [--concurrency 1]

1. The sidecar starts with a queued route whose upstream is down; wrk POSTs for `--seconds` with
   `--connections` connections: every answer is a 202 (the message is in the SQLite file, fsync on).
2. The upstream (bench/fast_upstream.py) starts; the bench polls `sidecar_deliveries_total` until
   every accepted message is delivered, and reports the rate.
Only loopback; every child is killed on the way out; each phase is bounded in time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from servers import free_ports, image_environment

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DRAIN_LIMIT_S = 300.0
READY_LIMIT_S = 10.0


def config(port: int, admin: int, upstream: int, concurrency: int) -> str:
    return f"""listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}}}
log: {{access: false}}
upstreams:
  hooks: {{endpoints: [http://127.0.0.1:{upstream}]}}
routes:
  - name: hooks
    match: {{path_prefix: /}}
    upstream: hooks
    circuit_breaker: {{enabled: false}}
    delivery:
      concurrency: {concurrency}
      backoff: {{base: 10ms, max: 100ms}}
      max_pending: 10000000
      max_bytes: 4GiB
"""


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the process behind {url} exited with {proc.returncode}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {READY_LIMIT_S:g}s")


def counter(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    port, admin, upstream = free_ports(3)
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="delivery-bench-") as tmp:
        work = Path(tmp)
        (work / "sidecar.yaml").write_text(config(port, admin, upstream, args.concurrency))
        (work / "post.lua").write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {args.body_size})\n'
                                       'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        try:
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--config", str(work / "sidecar.yaml"),
                 "--state-dir", str(work / "state")],
                cwd=REPO, env={**image_environment(), "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                stderr=None,
            )
            children.append(sidecar)
            wait_ready(f"http://127.0.0.1:{admin}/readyz", sidecar)
            idle = rss_mib(sidecar.pid)
            wrk = subprocess.run(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "-s", str(work / "post.lua"),
                 f"http://127.0.0.1:{port}/hook"],
                capture_output=True, text=True, timeout=args.seconds + 30, check=True,
            ).stdout
            rate = re.search(r"Requests/sec:\s+([\d.]+)", wrk)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
            metrics = get(f"http://127.0.0.1:{admin}/metrics")
            stored = counter(metrics, "sidecar_queue_messages", status="queued") + counter(
                metrics, "sidecar_queue_messages", status="delivering")
            accepted_rss = rss_mib(sidecar.pid)
            print(f"accepted: {rate.group(1) if rate else '?'} req/s over {args.seconds}s, "
                  f"{non2xx.group(1) if non2xx else 0} answers not 2xx; RSS {idle:.1f} MiB idle, "
                  f"{accepted_rss:.1f} MiB with the backlog stored")
            up = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), str(upstream)], cwd=HERE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            children.append(up)
            started = time.monotonic()
            delivered = 0.0
            while time.monotonic() - started < DRAIN_LIMIT_S:
                metrics = get(f"http://127.0.0.1:{admin}/metrics")
                delivered = counter(metrics, "sidecar_deliveries_total", outcome="delivered")
                queued = counter(metrics, "sidecar_queue_messages", status="queued")
                if delivered > 0 and queued == 0 and delivered >= stored:
                    break
                time.sleep(0.2)
            took = time.monotonic() - started
            print(f"delivered: {delivered:.0f} messages in {took:.1f}s after the upstream started "
                  f"({delivered / took:.0f}/s, concurrency {args.concurrency}, includes the upstream's start); "
                  f"peak RSS {rss_mib(sidecar.pid):.1f} MiB")
        finally:
            for child in children:
                child.terminate()
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()


if __name__ == "__main__":
    main()
