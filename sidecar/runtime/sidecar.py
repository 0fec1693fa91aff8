"""Starting and stopping a sidecar: client session, listeners, admin. No global state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.admin import AdminContext, Readiness, admin_app, health_and_metrics
from sidecar.cache import admin as cache_admin
from sidecar.cache.layer import RouteCache
from sidecar.config import Address, Config, ConfigError, RouteSpec, load_config
from sidecar.config.delivery import lease_of
from sidecar.delivery.admin import delivery_routes
from sidecar.delivery.queue import RouteQueue
from sidecar.delivery.service import DeliveryService
from sidecar.delivery.store import StoreError
from sidecar.errors import ReloadError
from sidecar.proxy.early import EarlyAnswers
from sidecar.proxy.endpoints import EndpointPool
from sidecar.proxy.listener import ActiveRoute, Listener
from sidecar.proxy.stack import RouteState, new_route_state, route_stack
from sidecar.telemetry.access_log import AccessLog
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import FLUSH_SECONDS, NO_ROUTE, Metrics, multiprocess_dir, multiprocess_registry
from sidecar.wire.server_protocol import GuardedServer
from sidecar.wire.upstream_client import UpstreamClient

log = logging.getLogger("sidecar")

# Our own header limits are generous: upstreams may send more than aiohttp's 8 KiB default.
MAX_LINE = MAX_FIELD = 65536


@dataclass(slots=True)
class OpenListener:
    listener: Listener
    runner: web.ServerRunner
    bound: tuple[str, int]


class Sidecar:
    """A running sidecar: `start()`, `reload()`, then `drain_and_stop()` (or `stop()`)."""

    def __init__(
        self, config: Config, registry: CollectorRegistry | None = None, log_stream: TextIO | None = None,
        config_path: str | None = None, reuse_port: bool = False, state_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._wall_clock = wall_clock  # route caches' clock (tests move a fake one)
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.events = EventBus(self.metrics)
        self.access_log = AccessLog(config.log, log_stream)
        self.readiness = Readiness()
        self._reuse_port = reuse_port
        self._client: UpstreamClient | None = None
        self._listeners: dict[Address, OpenListener] = {}
        self._service_runners: list[web.BaseRunner] = []  # admin and metrics
        self._pools: dict[str, EndpointPool] = {}
        self._routes: dict[str, ActiveRoute] = {}
        self._reloading = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()
        self.admin_bound: tuple[str, int] | None = None
        self.metrics_bound: tuple[str, int] | None = None
        # Called after a reload through the admin API (set by a worker to reach its siblings).
        self.on_reloaded: Callable[[], None] | None = None
        # Called after a cache purge through the admin API, with its route (None: all) and prefix
        # (set by a worker to reach its siblings, which apply it with purge_cache).
        self.on_purged: Callable[[str | None, str], None] | None = None
        self._metrics_flush: asyncio.TimerHandle | None = None  # with several workers
        # Durable delivery: where its SQLite file lives, and the store and deliverers once a route queues.
        self.state_dir = state_dir or default_state_dir()
        self.delivery: DeliveryService | None = None

    @property
    def scrape_registry(self) -> CollectorRegistry:
        return multiprocess_registry(self.metrics) or self.registry

    @property
    def bound(self) -> dict[Address, tuple[str, int]]:
        """Listener address as configured -> the (host, port) actually bound (port 0 picks one)."""
        return {address: open_.bound for address, open_ in self._listeners.items()}

    @property
    def route_states(self) -> dict[str, RouteState]:
        return {name: route.state for name, route in self._routes.items()}

    async def start(self) -> None:
        """Raises StoreError (naming the directory or file) when a queued route's store cannot be opened."""
        await self._open_delivery(self.config)
        self._client = UpstreamClient(MAX_LINE, MAX_FIELD, self.metrics.connections)
        self._pools, self._routes = self._build(self.config)
        self._run_delivery(self.config)
        self._caches_replaced({}, self._routes)
        try:
            for address in self.config.listeners:
                self._listeners[address] = await self._open_listener(address, self.config)
            context = self.admin_context()
            self.admin_bound = await self._serve(admin_app(context), self.config.admin_listen)
            if self.config.metrics_listen is not None:
                self.metrics_bound = await self._serve(health_and_metrics(context), self.config.metrics_listen)
        except BaseException:
            await self.stop()
            raise
        self._loaded("sidecar started")
        self.readiness.ready = True
        if multiprocess_dir() is not None:
            self._flush_metrics()

    def admin_context(self) -> AdminContext:
        """The admin app's view of this sidecar: explicit, so the admin package never imports this one."""
        return AdminContext(
            readiness=self.readiness,
            registry=self.scrape_registry,
            events=self.events,
            config=lambda: self.config,
            breakers=lambda: {name: route.state.breaker for name, route in self._routes.items()},
            reload=self._reload_from_admin,
            extensions=(delivery_routes(lambda: self.delivery),
                        cache_admin.admin_extension(self._caches, self._purged_from_admin)),
            route_extras=(cache_admin.route_extras(self._caches),),
        )

    def _caches(self) -> dict[str, RouteCache | None]:
        """The route caches in force now, by route (None: no `cache:`), for the admin API."""
        return {name: route.state.cache for name, route in self._routes.items()}

    def purge_cache(self, route: str | None, prefix: str) -> dict[str, int]:
        """Apply a cache purge made elsewhere (another worker's admin API): entries dropped, by route."""
        return cache_admin.purge(self._caches(), route, prefix)

    def _purged_from_admin(self, route: str | None, prefix: str) -> None:
        if self.on_purged is not None:
            self.on_purged(route, prefix)  # with workers: tell the others, through the supervisor

    async def _reload_from_admin(self) -> None:
        await self.reload_from_file()
        if self.on_reloaded is not None:
            self.on_reloaded()  # with workers: tell the supervisor, which tells the others

    def _flush_metrics(self) -> None:
        """Several workers: fold this worker's metric tallies into its shared files, and again later."""
        self.metrics.flush()
        self._metrics_flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_metrics)

    def _build(self, config: Config) -> tuple[dict[str, EndpointPool], dict[str, ActiveRoute]]:
        """Routes and endpoint pools for `config`, keeping those whose config did not change
        (with their breaker state, budget and ejections)."""
        assert self._client is not None
        clock = asyncio.get_running_loop().time
        pools: dict[str, EndpointPool] = {}
        for upstream in config.upstreams:
            old = self._pools.get(upstream.name)
            pools[upstream.name] = old if old and old.spec == upstream else EndpointPool(
                upstream, self.metrics, clock, self.events)
        routes: dict[str, ActiveRoute] = {}
        for spec in config.routes:
            old_route = self._routes.get(spec.name)
            if old_route is not None and old_route.spec == spec:
                routes[spec.name] = old_route
                continue
            state = new_route_state(spec, self.metrics.route(spec.name), pools[spec.upstream.name], clock, self.events,
                                    self._wall_clock)
            routes[spec.name] = ActiveRoute(spec, route_stack(spec, self._client, state), state,
                                            self._queue(spec, state))
        return pools, routes

    async def _open_delivery(self, config: Config) -> None:
        """Open the delivery store the first time a route queues; it stays open across reloads."""
        if self.delivery is None and any(route.delivery for route in config.routes):
            self.delivery = await DeliveryService.open(
                config.delivery.store, self.state_dir, self.metrics.delivery, self.events)
        elif self.delivery is not None and config.delivery != self.config.delivery:
            log.warning("delivery.store changes take effect after a restart")

    def _queue(self, spec: RouteSpec, state: RouteState) -> RouteQueue | None:
        """A queued route's accept and send: its own stack with the synchronous retries off
        (the queue's schedule replaces them), sharing the route's limits, breaker and endpoints."""
        if spec.delivery is None or self.delivery is None:
            return None
        assert self._client is not None
        once = dataclasses.replace(spec, retries=msgspec.structs.replace(spec.retries, attempts=1))
        breaker = state.breaker
        breaker_open = breaker.refusing if breaker is not None else (lambda: False)
        return self.delivery.queue(spec.name, spec.delivery, route_stack(once, self._client, state), breaker_open,
                                   spec.timeouts.idle)

    def _run_delivery(self, config: Config) -> None:
        if self.delivery is not None:
            queues = {name: route.queue for name, route in self._routes.items() if route.queue is not None}
            leases = {route.name: lease_of(route.delivery, route.timeouts.total)
                      for route in config.routes if route.delivery is not None}
            self.delivery.run(queues, leases, config.shutdown.timeout)

    def _caches_replaced(self, before: dict[str, ActiveRoute], after: dict[str, ActiveRoute]) -> None:
        """From the routes `before` to those `after`: the caches of routes that changed or went are
        closed (background refreshes stop, entries are let go), and the metrics follow the new ones.
        A route whose config changed starts with an empty cache; an unchanged route keeps its own."""
        kept = {route.state.cache for route in after.values()}
        for route in before.values():
            if route.state.cache is not None and route.state.cache not in kept:
                route.state.cache.close()
        for name, route in after.items():
            if before.get(name) is not route:
                cache = route.state.cache
                self.metrics.route(name).cache_watched(cache.figures if cache is not None else None)
        for name in before.keys() - after.keys():
            self.metrics.route(name).cache_watched(None)

    def _routes_on(self, address: Address) -> list[ActiveRoute]:
        return [route for route in self._routes.values() if route.spec.listen == address]

    async def _open_listener(self, address: Address, config: Config) -> OpenListener:
        limits = config.server
        listener = Listener(self._routes_on(address), self.metrics.route(NO_ROUTE), self.access_log, limits)
        server = GuardedServer(
            listener.handle, limits, auto_decompress=False, access_log=None,
            # The request line is checked against our own limit (414) in request_checks;
            # the parser's cap on it is only a backstop.
            max_line_size=MAX_LINE, max_field_size=limits.max_header_size, max_headers=limits.max_headers,
            keepalive_timeout=limits.keepalive_timeout,
            # A caller that hangs up cancels its request: the upstream attempt stops,
            # its slot and connection are freed, and the breaker counts nothing.
            handler_cancellation=True,
        )
        server.early_answer = _early_answers(listener)
        runner = web.ServerRunner(server, shutdown_timeout=config.shutdown.timeout)
        await runner.setup()
        try:
            return OpenListener(listener, runner, await self._start_site(runner, address))
        except BaseException:
            await runner.cleanup()
            raise

    async def _serve(self, app: web.Application, address: Address) -> tuple[str, int]:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._service_runners.append(runner)
        return await self._start_site(runner, address)

    async def _start_site(self, runner: web.BaseRunner, address: Address) -> tuple[str, int]:
        site = web.TCPSite(runner, address.host, address.port, reuse_port=self._reuse_port or None)
        await site.start()
        sockname = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        return sockname[0], sockname[1]

    async def reload_from_file(self) -> None:
        """Reload from `config_path`; an invalid config is refused whole (ReloadError) and the old one serves on."""
        path = self.config_path
        if path is None:
            raise ReloadError("this sidecar was not started from a config file")
        try:
            config = load_config(path)
        except ConfigError as exc:
            self._refused(f"{path}: {exc}")
        await self.reload(config)

    async def reload(self, config: Config) -> None:
        async with self._reloading:
            try:
                await self._open_delivery(config)
            except StoreError as exc:
                self._refused(str(exc))
            pools, routes = self._build(config)
            previous = self._routes
            self._routes = routes  # _open_listener reads it
            opened: dict[Address, OpenListener] = {}
            try:
                for address in config.listeners:
                    if address not in self._listeners:
                        opened[address] = await self._open_listener(address, config)
            except OSError as exc:
                self._routes = previous
                self._caches_replaced(routes, previous)
                for open_ in opened.values():
                    await open_.runner.cleanup()
                self._refused(f"cannot listen on {address}: {exc.strerror or exc}")
            for address in [a for a in self._listeners if a not in config.listeners]:
                self._drain_in_background(self._listeners.pop(address))
            for address, open_ in self._listeners.items():
                open_.listener.update(self._routes_on(address))
                open_.listener.limits = config.server  # checks per request; parser sizes need a restart
                if isinstance(guarded := open_.runner.server, GuardedServer):
                    guarded.limits = config.server  # new connections, and server.underscore_headers at once
                    guarded.early_answer = _early_answers(open_.listener)
            self._listeners.update(opened)
            self._pools = pools
            self._caches_replaced(previous, routes)
            if (config.admin_listen, config.metrics_listen) != (self.config.admin_listen, self.config.metrics_listen):
                log.warning("admin.listen and metrics.listen changes take effect after a restart")
            self.config = config
            self._run_delivery(config)
            self.access_log.configure(config.log)
            self._loaded("config reloaded")

    def _loaded(self, how: str) -> None:
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_success.set_to_current_time()
        self.events.publish("config_loaded", None, routes=len(self.config.routes))
        listeners = [f"{host}:{port}" for host, port in self.bound.values()]
        log.info(how, extra={"routes": len(self.config.routes), "listeners": listeners})

    def _refused(self, message: str) -> NoReturn:
        self.metrics.config_reloads.labels("failure").inc()
        self.events.publish("config_reload_failed", None, message=message)
        log.error("config reload refused; the previous config keeps serving", extra={"reason": message})
        raise ReloadError(message)

    def _drain_in_background(self, open_: OpenListener) -> None:
        """A listener the new config dropped: stop accepting, let its requests finish."""
        open_.listener.draining = True
        task = asyncio.create_task(self._close_listener(open_))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _close_listener(self, open_: OpenListener) -> None:
        """Stop accepting and let requests finish for up to shutdown.timeout; WebSocket connections
        are open-ended, so when that time is up they are closed with 1001 (going away)."""
        loop = asyncio.get_running_loop()
        going_away = loop.call_later(self.config.shutdown.timeout, open_.listener.tunnels.go_away)
        try:
            await open_.runner.cleanup()
        finally:
            going_away.cancel()

    async def drain_and_stop(self) -> None:
        """SIGTERM: not ready at once, keep serving for drain_delay, then stop (in-flight get shutdown.timeout)."""
        self.readiness.ready = False
        for open_ in self._listeners.values():
            open_.listener.draining = True
        log.info("draining", extra={"drain_delay": float(self.config.shutdown.drain_delay)})
        await asyncio.sleep(self.config.shutdown.drain_delay)
        await self.stop()

    async def stop(self) -> None:
        self.readiness.ready = False
        self.events.close()  # ends /api/v1/events streams so the admin runner can stop
        # All traffic listeners at once: stop accepting, close idle keep-alives, wait for
        # in-flight requests up to shutdown.timeout, then cancel what is left (open streams).
        # Deliverers stop alongside: attempts in flight get shutdown.timeout, the rest stays stored.
        delivering = [self.delivery.stop(self.config.shutdown.timeout)] if self.delivery is not None else []
        await asyncio.gather(*(self._close_listener(open_) for open_ in self._listeners.values()), *self._draining,
                             *delivering)
        self._listeners.clear()
        for route in self._routes.values():
            if route.state.cache is not None:
                route.state.cache.close()  # after the listeners: requests finishing may still read it
        if self.delivery is not None:
            await self.delivery.close()
            self.delivery = None
        for runner in self._service_runners:
            await runner.cleanup()
        self._service_runners.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._metrics_flush is not None:
            self._metrics_flush.cancel()
            self._metrics_flush = None
            self.metrics.flush()  # every request answered is in the files before the worker exits
        self.access_log.flush()


def _early_answers(listener: Listener) -> EarlyAnswers | None:
    """What a listener's server offers requests to first: fresh cache hits (proxy/early.py);
    nothing, at no cost, on a listener without cached routes."""
    return EarlyAnswers(listener) if listener.caches else None


async def serve_until_stopped(sidecar: Sidecar, stop: asyncio.Event, watch: float | None = None) -> None:
    """Run until `stop` is set, reloading on SIGHUP (and on file changes with `watch` seconds)."""
    await sidecar.start()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload_logged(sidecar))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # A worker starts with SIGHUP blocked (runtime/workers.py), so a reload forwarded while it
    # started waits; it arrives now. While draining it is blocked again before the handler goes:
    # SIGHUP's default action would end the process mid-drain.
    held = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    watcher = loop.create_task(watch_file(sidecar, watch)) if watch and sidecar.config_path else None
    try:
        await stop.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()
        try:
            await sidecar.drain_and_stop()
        finally:
            if signal.SIGHUP not in held:  # as it was before (a test's own process, say)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


async def _reload_logged(sidecar: Sidecar) -> None:
    with contextlib.suppress(ReloadError):  # already logged and counted
        await sidecar.reload_from_file()


async def watch_file(sidecar: Sidecar, every: float) -> None:
    """Reload when the config file's content changes (checked by mtime, size, then hash)."""
    path = Path(sidecar.config_path or "")
    seen = _fingerprint(path)
    digest = _digest(path)
    while True:
        await asyncio.sleep(every)
        now = _fingerprint(path)
        if now == seen:
            continue
        seen = now
        new_digest = _digest(path)
        if new_digest != digest:
            digest = new_digest
            await _reload_logged(sidecar)


def _fingerprint(path: Path) -> tuple[float, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def default_state_dir() -> Path:
    """--state-dir, else $SIDECAR_STATE_DIR, else ~/.local/state/sidecar (no root needed after a pip install)."""
    return Path(os.environ.get("SIDECAR_STATE_DIR") or Path.home() / ".local" / "state" / "sidecar")
