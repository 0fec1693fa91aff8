"""What the bench's own servers (fast_upstream.py, naive_proxy.py) share: serve on a loopback port until
the bench sends SIGINT or SIGTERM, or for an hour if it could not (it was SIGKILLed), so none lingers."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

MAX_LIFETIME_S = 3600.0


async def serve_until_signalled(runner: web.BaseRunner, port: int) -> None:
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), MAX_LIFETIME_S)
    except TimeoutError:
        pass
    finally:
        await runner.cleanup()
