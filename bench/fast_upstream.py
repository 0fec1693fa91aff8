"""A minimal aiohttp upstream for the benchmark, used when nginx is not installed.

Run as `python bench/fast_upstream.py PORT [--body-size BYTES]`. Every request gets `200` with a fixed body
(1 KiB by default), so the upstream does as little work as aiohttp allows and the sidecar's overhead stands out.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from aiohttp import web
from serving import serve_until_signalled


async def serve(port: int, body_size: int) -> None:
    body = b"x" * body_size

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    # No access log: formatting a log line per request would cost more than the handler itself.
    await serve_until_signalled(web.AppRunner(app, access_log=None), port)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the fallback upstream should be as fast as we can make it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--body-size", type=int, default=1024, help="response body bytes (1024)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(args.port, args.body_size))


if __name__ == "__main__":
    main()
