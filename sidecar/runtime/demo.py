"""`sidecar demo`: a demo upstream that misbehaves on purpose, with the sidecar in front of it."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.config import parse_config
from sidecar.runtime.sidecar import Sidecar

DEMO_CONFIG = """
listen: {listen}
admin:
  listen: {admin}
shutdown: {{drain_delay: 0s, timeout: 1s}}   # a demo stops at once on Ctrl-C
defaults:
  timeouts: {{connect: 500ms, per_try: 1s, total: 5s, idle: 30s}}
upstreams:
  demo:
    endpoints: [http://{upstream}]
  nowhere:
    endpoints: [http://127.0.0.1:1]   # nothing listens here: connect_failure
routes:
  - name: demo
    match: {{path_prefix: /demo/}}
    upstream: demo
    strip_prefix: true
  - name: flaky            # its own route, so its breaker trips alone
    match: {{path_prefix: /demo/flaky}}
    upstream: demo
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 5s}}
  - name: reset
    match: {{path_prefix: /demo/reset}}
    upstream: demo
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 5s}}
  - name: nowhere
    match: {{path_prefix: /nowhere/}}
    upstream: nowhere
  - name: cached           # a response cache: fresh hits without the upstream, stale ones while it fails
    match: {{path_prefix: /demo/cached}}
    upstream: demo
    cache: {{}}
"""


Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


def demo_upstream(failure_rate: float = 0.5) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the demo upstream\n")

    async def flaky(request: web.Request) -> web.Response:
        if random.random() < failure_rate:
            return web.Response(status=503, text="demo upstream: unlucky this time\n")
        return web.Response(text="demo upstream: lucky this time\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "3")))
        return web.Response(text="demo upstream: finally\n")

    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()  # drop the connection before any response
        return web.Response()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for number in range(1, 21):
            await response.write(f"id: {number}\ndata: tick {number}\n\n".encode())
            await asyncio.sleep(0.5)
        return response

    down = False  # POST .../down and .../up switch /cached between failing and answering

    async def cached(request: web.Request) -> web.Response:
        if down:
            return web.Response(status=503, text="demo upstream: down, as asked\n")
        return web.Response(text=f"demo upstream: the time is {time.strftime('%H:%M:%S')}\n",
                            headers={"Cache-Control": "max-age=10"})

    def switch(to_down: bool) -> Behaviour:
        async def set_down(request: web.Request) -> web.Response:
            nonlocal down
            if request.method != "POST":
                raise web.HTTPMethodNotAllowed(request.method, ["POST"])
            down = to_down
            return web.Response(text=f"demo upstream: /cached is now {'down' if down else 'up'}\n")

        return set_down

    # Answer by the last path segment, so routes may strip their prefix or not.
    behaviours: dict[str, Behaviour] = {
        "hello": hello, "flaky": flaky, "slow": slow, "reset": reset, "events": events, "cached": cached,
        "down": switch(True), "up": switch(False),
    }

    async def dispatch(request: web.Request) -> web.StreamResponse:
        behaviour = behaviours.get(request.path.rstrip("/").rsplit("/", 1)[-1])
        if behaviour is None:
            raise web.HTTPNotFound(text="demo upstream: try /hello, /flaky, /slow, /reset, /events or /cached\n")
        return await behaviour(request)

    app = web.Application()
    app.router.add_get("/{tail:.*}", dispatch)
    app.router.add_post("/{tail:.*}", dispatch)
    return app


async def run_demo(listen: str, admin: str, upstream: str, stop: asyncio.Event) -> None:
    host, port = upstream.rsplit(":", 1)
    upstream_runner = web.AppRunner(demo_upstream(), access_log=None)
    await upstream_runner.setup()
    await web.TCPSite(upstream_runner, host, int(port)).start()
    config = parse_config(DEMO_CONFIG.format(listen=listen, admin=admin, upstream=upstream), {})
    sidecar = Sidecar(config)
    try:
        await sidecar.start()
        base = f"http://{listen}"
        print(f"""
sidecar demo: the sidecar listens on {base}, in front of a demo upstream on http://{upstream}

Try:
  curl -i {base}/demo/hello           # forwarded, with an X-Request-Id added
  curl -i {base}/demo/flaky           # fails half the time; a failed GET is retried once (see x-sidecar-attempts)
  curl -i {base}/demo/slow            # upstream takes 3s; per_try is 1s: 504, x-sidecar-error: timeout
  curl -i {base}/demo/reset           # upstream drops the connection: 502 upstream_reset;
                                      #   again 3 times: the breaker opens, 503 circuit_open with Retry-After
  curl -i {base}/nowhere/             # nothing listens there: 502 connect_failure
  curl -i {base}/elsewhere            # no route matches: 404 no_route
  curl -N {base}/demo/events          # server-sent events, each as it is written
  curl -i {base}/demo/cached          # cached 10s: MISS, then HIT with Age (x-sidecar-cache), no upstream hop
  curl -X POST {base}/demo/cached/down  # the upstream now fails /cached (POST {base}/demo/cached/up: back)
  curl -i -H 'Cache-Control: no-cache' {base}/demo/cached
                                      # asks the upstream, which fails: the last good answer, marked STALE,
                                      #   x-sidecar-stale-reason: status_503 (so does a plain GET after 10s)

Metrics: curl http://{admin}/metrics
Health:  curl http://{admin}/healthz   Ready: curl http://{admin}/readyz
Ctrl-C to stop.
""", flush=True)
        await stop.wait()
    finally:
        await sidecar.stop()
        await upstream_runner.cleanup()
