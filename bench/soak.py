"""Soak: a mixed workload with faults through a real sidecar process, watching RSS and open fds.

    python bench/soak.py --requests 200000 --every 10000

Starts a misbehaving upstream (in this process) and `sidecar run` (a subprocess), then sends a
fixed count of requests (bounded: also a time limit) over 16 concurrent keep-alive callers:
plain GETs, POSTs with bodies, upstream 503s (retried), resets, per-try timeouts, a route to a
closed port, streaming bodies and callers that hang up early. Every `--every` requests it
records the sidecar's RSS and open file descriptors. After warm-up (the first sample) both must
stay flat: exit 1 when RSS grows by more than --max-rss-growth MiB or fds by more than
--max-fd-growth. Prints one JSON document with the series. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def upstream_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"x" * 1024)

    async def sick(request: web.Request) -> web.Response:
        return web.Response(status=503)

    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="late")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"y" * 4096)
        return response

    app = web.Application()
    for path, handler in (("/ok", ok), ("/sick", sick), ("/reset", reset), ("/slow", slow), ("/stream", stream)):
        app.router.add_route("*", path, handler)
    return app


CONFIG = """
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin}}}
log: {{access: false}}
shutdown: {{drain_delay: 0s, timeout: 2s}}
defaults:
  timeouts: {{per_try: 100ms, total: 1s}}
  retries: {{backoff: {{base: 1ms, max: 5ms}}}}
  circuit_breaker: {{enabled: false}}
upstreams:
  up: {{endpoints: ["http://127.0.0.1:{upstream}"]}}
  closed: {{endpoints: ["http://127.0.0.1:{closed}"]}}
routes:
  - {{name: up, match: {{path_prefix: /}}, upstream: up}}
  - {{name: closed, match: {{path_prefix: /closed}}, upstream: closed}}
"""
WORKLOAD = ["/ok"] * 12 + ["/sick", "/reset", "/slow", "/stream", "/closed", "post", "hangup"]


async def call(session: aiohttp.ClientSession, base: str, rng: random.Random) -> None:
    kind = rng.choice(WORKLOAD)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        if kind == "post":
            async with session.post(base + "/ok", data=b"p" * rng.randrange(1, 100_000)) as response:
                await response.read()
        elif kind == "hangup":
            async with asyncio.timeout(0.01):
                async with session.get(base + "/slow") as response:
                    await response.read()
        else:
            async with session.get(base + kind) as response:
                await response.read()


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sidecar.yaml"
        config.write_text(CONFIG.format(port=port, admin=admin, upstream=upstream_port, closed=free_port()))
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the load
            [sys.executable, "-m", "sidecar", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            return await drive(args, process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
            await runner.cleanup()


async def drive(args: argparse.Namespace, process: subprocess.Popen[bytes], base: str, admin: str) -> dict[str, Any]:
    deadline = time.monotonic() + args.time_limit
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for _ in range(200):  # readiness by handshake, bounded
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(admin + "/readyz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        rng = random.Random(args.seed)
        samples: list[dict[str, float]] = []
        sent = 0
        while sent < args.requests and time.monotonic() < deadline:
            batch = min(args.every, args.requests - sent)
            tickets = iter(range(batch))  # shared by the callers: each request is taken once

            async def caller(tickets: Any = tickets) -> None:
                for _ in tickets:
                    await call(session, base, rng)

            await asyncio.gather(*(caller() for _ in range(args.concurrency)))
            sent += batch
            samples.append({"requests": sent, "rss_mib": round(rss_mib(process.pid), 2),
                            "fds": open_fds(process.pid)})
    warm = samples[0]
    rss_growth = max(s["rss_mib"] for s in samples) - warm["rss_mib"]
    fd_growth = max(s["fds"] for s in samples) - warm["fds"]
    return {"requests": sent, "samples": samples, "rss_growth_mib": round(rss_growth, 2), "fd_growth": fd_growth,
            "ok": rss_growth <= args.max_rss_growth and fd_growth <= args.max_fd_growth and sent == args.requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=10_000, help="sample RSS and fds every this many requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds; stop early past this")
    parser.add_argument("--max-rss-growth", type=float, default=8.0, help="MiB allowed after warm-up")
    # Pooled upstream connections come and go with the 16 callers in flight: up to that many is
    # noise; a leak of one fd per hundred failing requests would add hundreds.
    parser.add_argument("--max-fd-growth", type=int, default=16, help="fds allowed after warm-up (pooled sockets)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
