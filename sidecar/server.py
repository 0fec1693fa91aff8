"""Starting and stopping a sidecar: client session, listeners, admin. No global state."""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.access_log import AccessLog
from sidecar.admin import Readiness, admin_app
from sidecar.config import Address, Config
from sidecar.endpoints import EndpointPool
from sidecar.events import EventBus
from sidecar.metrics import NO_ROUTE, Metrics
from sidecar.proxy import ActiveRoute, Listener
from sidecar.stack import RouteState, new_route_state, route_stack

log = logging.getLogger("sidecar")

# Our own header limits are generous: upstreams may send more than aiohttp's 8 KiB default.
MAX_LINE = MAX_FIELD = 65536
# Below the idle timeout of common upstream servers (Node's default is 5s), so we
# rarely reuse a connection the upstream is closing at the same moment.
UPSTREAM_KEEPALIVE = 4.0
# How long in-flight requests may finish on stop (graceful drain is its own issue).
SHUTDOWN_TIMEOUT = 5.0


def client_session() -> aiohttp.ClientSession:
    """One pooled client for the process. It must not change what the caller sent."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE)
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through; Content-Encoding stays true
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        max_line_size=MAX_LINE,
        max_field_size=MAX_FIELD,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep cookies between callers
    )
    # aiohttp silently resends idempotent requests once when a pooled connection turns
    # out dead. Attempts are the retry layer's job, counted and bounded there, so an
    # upstream sees exactly the attempts we report.
    session._retry_connection = False
    return session


class Sidecar:
    """A running sidecar. `start()` binds everything; `stop()` releases it."""

    def __init__(
        self, config: Config, registry: CollectorRegistry | None = None, log_stream: TextIO | None = None
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.events = EventBus(self.metrics)
        self.access_log = AccessLog(config.log, log_stream)
        self.readiness = Readiness()
        self._runners: list[web.BaseRunner] = []
        self._session: aiohttp.ClientSession | None = None
        # Listener address as configured -> the (host, port) actually bound (port 0 picks one).
        self.bound: dict[Address, tuple[str, int]] = {}
        self.admin_bound: tuple[str, int] | None = None
        self.route_states: dict[str, RouteState] = {}

    async def start(self) -> None:
        self._session = session = client_session()
        clock = asyncio.get_running_loop().time
        pools = {
            upstream.name: EndpointPool(upstream, self.metrics, clock, self.events)
            for upstream in self.config.upstreams
        }
        routes = []
        for spec in self.config.routes:
            metrics = self.metrics.route(spec.name)
            state = new_route_state(spec, metrics, pools[spec.upstream.name], clock, self.events)
            self.route_states[spec.name] = state
            routes.append(ActiveRoute(spec, route_stack(spec, session, state), state))
        unmatched = self.metrics.route(NO_ROUTE)
        try:
            for address in self.config.listeners:
                listener = Listener([r for r in routes if r.spec.listen == address], unmatched, self.access_log)
                server = web.Server(
                    listener.handle, auto_decompress=False, access_log=None,
                    max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
                    # A caller that hangs up cancels its request: the upstream attempt stops,
                    # its slot and connection are freed, and the breaker counts nothing.
                    handler_cancellation=True,
                )
                runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
                self.bound[address] = await self._serve(runner, address)
            admin = web.AppRunner(admin_app(self), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
            self.admin_bound = await self._serve(admin, self.config.admin_listen)
        except BaseException:
            await self.stop()
            raise
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_success.set_to_current_time()
        self.events.publish("config_loaded", None, routes=len(self.config.routes))
        self.readiness.ready = True

    async def _serve(self, runner: web.BaseRunner, address: Address) -> tuple[str, int]:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, address.host, address.port)
        await site.start()
        sockname = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        return sockname[0], sockname[1]

    async def stop(self) -> None:
        self.readiness.ready = False
        self.events.close()  # ends /api/v1/events streams so the admin runner can stop
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.access_log.flush()


async def serve_until_stopped(sidecar: Sidecar, stop: asyncio.Event) -> None:
    await sidecar.start()
    listeners = [f"{host}:{port}" for host, port in sidecar.bound.values()]
    admin = "{}:{}".format(*(sidecar.admin_bound or ("?", 0)))
    log.info("sidecar started", extra={"listeners": listeners, "admin": admin, "routes": len(sidecar.config.routes)})
    try:
        await stop.wait()
    finally:
        await sidecar.stop()
