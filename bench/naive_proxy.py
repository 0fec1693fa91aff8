"""The reference baseline for bench.py: the simplest reasonable aiohttp reverse proxy, with no policies.

Run as `python bench/naive_proxy.py PORT UPSTREAM_URL [--loop asyncio|uvloop]`. One shared ClientSession,
bodies streamed both ways, hop-by-hop headers and Host dropped. What the sidecar costs beyond this is the
price of its features.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from serving import serve_until_signalled

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host"})


def forwardable(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]  # every value of a multidict


async def serve(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        response = web.StreamResponse()
        try:
            async with session.request(request.method, upstream + request.path_qs, headers=forwardable(request.headers),
                                       data=body, allow_redirects=False) as upstream_resp:
                response.set_status(upstream_resp.status, upstream_resp.reason)
                response.headers.extend(forwardable(upstream_resp.headers))
                await response.prepare(request)
                async for chunk in upstream_resp.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, ConnectionResetError):
            if not response.prepared:
                return web.Response(status=502, text="bad gateway\n")
            if request.transport is None or request.transport.is_closing():
                return response  # the client left (wrk does, mid-request, when its run ends): nothing to say
            raise  # the upstream cut the body short after we sent headers: aiohttp drops the connection

    try:
        await serve_until_signalled(web.ServerRunner(web.Server(handle, access_log=None)), port)
    finally:
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream", help="e.g. http://127.0.0.1:8080 (no trailing slash)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
