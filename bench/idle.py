"""What idle keep-alive connections cost a proxy (`bench.py --idle-connections N`).

The bench process itself opens N connections to the proxy on 127.0.0.1 (asyncio streams, at most
CONCURRENCY opening at a time), sends one GET on each and reads the whole response, then keeps them all open
and idle. The proxy's RSS (summed over its process tree) is read before the first connection and again once
all are open and have settled: the difference over N is the memory one idle client connection holds. The
whole phase is bounded in time; the connections are closed before the next proxy is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from procs import BenchError, rss_mib
from servers import Server, progress

CONCURRENCY = 64  # connections being opened at once: each proxy's upstream pool grows to about this
SETTLE_S = 1.0  # after the last connection opened, before RSS is read: lets buffers be freed
REQUEST_TIMEOUT_S = 10.0
FD_HEADROOM = 256  # descriptors beyond the N idle sockets: logs, pipes, upstream connections, wrk's leftovers


@dataclass
class IdleResult:
    connections: int  # asked for
    answered: int  # got a 2xx response on their one request
    open_at_end: int  # still open (no EOF from the proxy) when RSS was read
    rss_before_mib: float
    rss_after_mib: float
    kib_per_connection: float
    open_seconds: float  # time to open them all and get the answers
    fd_limit: int | None  # the proxy's own RLIMIT_NOFILE (soft), from /proc/<pid>/limits


def raise_fd_limit(connections: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE so it can hold `connections` sockets. Done before any server
    starts, so the servers inherit the new limit too (each holds one socket per client plus its upstream
    ones). Fails if the hard limit is too low."""
    needed = connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"--idle-connections {connections} needs {needed} file descriptors, but the hard limit "
                         f"(ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def fd_limit(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def time_limit(connections: int) -> float:
    """Generous for a slow proxy: 10 s plus 10 ms a connection (the sidecar needs well under 1 ms)."""
    return 10.0 + connections / 100


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body) and return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # the CRLF after the last (empty) chunk; the bench sends no trailers
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status


async def _hold(host: str, port: int, count: int, pid: int) -> IdleResult:
    gate = asyncio.Semaphore(CONCURRENCY)
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one() -> bool:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            streams.append((reader, writer))
            writer.write(request)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return 200 <= await _read_response(reader) < 300

    rss_before = rss_mib(pid)[0]
    start = time.monotonic()
    try:
        async with asyncio.timeout(time_limit(count)):
            results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        opened = time.monotonic() - start
        await asyncio.sleep(SETTLE_S)
        rss_after = rss_mib(pid)[0]
        open_at_end = sum(not reader.at_eof() and not writer.is_closing() for reader, writer in streams)
    finally:
        for _, writer in streams:
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(*(writer.wait_closed() for _, writer in streams), return_exceptions=True)
    answered = sum(result is True for result in results)
    per_connection = (rss_after - rss_before) * 1024 / count if count else math.nan
    return IdleResult(count, answered, open_at_end, rss_before, rss_after, per_connection, opened, fd_limit(pid))


def measure_idle(server: Server, count: int) -> IdleResult:
    """Open `count` idle keep-alive connections to `server` and read its RSS before and after."""
    if server.proc is None:
        raise BenchError("the idle-connection test needs a proxy process")
    url = urlsplit(server.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    limit = fd_limit(server.proc.pid)
    if limit is not None and limit < count + 64:
        progress(f"WARNING: {server.name} may open only {limit} files; {count} connections may not fit")
    progress(f"{server.name}: opening {count} idle keep-alive connections (at most {time_limit(count):.0f}s)")
    try:
        result = asyncio.run(_hold(host, port, count, server.proc.pid))
    except TimeoutError as exc:
        raise BenchError(f"{server.name}: {count} idle connections not open after {time_limit(count):.0f}s") from exc
    progress(f"{server.name}: {result.open_at_end} open, RSS {result.rss_before_mib:.1f} -> "
             f"{result.rss_after_mib:.1f} MiB ({result.kib_per_connection:.1f} KiB per connection)")
    return result
