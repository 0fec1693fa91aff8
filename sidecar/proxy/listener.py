"""A traffic listener: match the route, run its policy stack, relay the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from sidecar.cache.policy import CACHE_HEADER
from sidecar.config import RouteSpec
from sidecar.config.hosts import host_of
from sidecar.config.schema import Server
from sidecar.delivery.queue import RouteQueue
from sidecar.errors import BadRequest, CallerGone, NoRoute, PayloadTooLarge, RequestBodyTimeout, SidecarError
from sidecar.proxy.call import Call, Handler
from sidecar.proxy.stack import RouteState
from sidecar.telemetry.access_log import AccessLog
from sidecar.telemetry.exchange import Exchange
from sidecar.telemetry.metrics import RouteMetrics
from sidecar.wire.body import CallerBody
from sidecar.wire.headers import request_id_of, upstream_request_headers
from sidecar.wire.relay import relay
from sidecar.wire.request_checks import refusal
from sidecar.wire.responses import error_response
from sidecar.wire.server_protocol import GuardedHandler
from sidecar.wire.upstream_client import UpstreamResponse
from sidecar.wire.websocket import Tunnel, Tunnels, websocket_upgrade

log = logging.getLogger("sidecar.proxy")

# Request headers a caller may send to tighten its own request (never forwarded).
MAX_ATTEMPTS_HEADER = "x-sidecar-max-attempts"
TIMEOUT_HEADER = "x-sidecar-timeout-ms"
# Response headers on every routed answer.
ATTEMPTS_HEADER = "x-sidecar-attempts"
UPSTREAM_MS_HEADER = "x-sidecar-upstream-ms"


@dataclass(frozen=True, slots=True)
class ActiveRoute:
    """A route ready for traffic: its config, its built stack and its runtime state."""

    spec: RouteSpec
    handler: Handler
    state: RouteState
    queue: RouteQueue | None = None  # a route with `delivery:`: writes are stored and answered 202


class RouteTable:
    """Longest `path_prefix` wins; at equal length a route with a `host` beats one without."""

    def __init__(self, routes: list[ActiveRoute]) -> None:
        self._routes = sorted(routes, key=lambda r: (len(r.spec.path_prefix), r.spec.host is not None), reverse=True)
        self.caches = any(route.state.cache is not None for route in routes)

    def match(self, host_header: str, raw_path: str) -> ActiveRoute | None:
        host = None
        for route in self._routes:
            spec = route.spec
            if not raw_path.startswith(spec.path_prefix):
                continue
            if spec.host is not None:
                if host is None:
                    host = host_of(host_header)
                if host != spec.host:
                    continue
            return route
        return None


def upstream_target(spec: RouteSpec, raw_path: str) -> str:
    """The path and query for the upstream: raw bytes kept, the prefix removed if asked, still absolute."""
    if not spec.strip_prefix:
        return raw_path
    rest = raw_path[len(spec.path_prefix):]
    return rest if rest.startswith("/") else "/" + rest


def caller_limits(headers: CIMultiDictProxy[str]) -> tuple[int | None, float | None]:
    """x-sidecar-max-attempts and x-sidecar-timeout-ms: a caller may tighten its own request."""
    attempts = timeout = None
    if (value := headers.get(MAX_ATTEMPTS_HEADER)) is not None:
        attempts = _whole_number(MAX_ATTEMPTS_HEADER, value, "a whole number of at least 1")
    if (value := headers.get(TIMEOUT_HEADER)) is not None:
        timeout = _whole_number(TIMEOUT_HEADER, value, "a whole number of milliseconds above 0") / 1000
    return attempts, timeout


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def continue_sender(request: web.BaseRequest) -> Callable[[], None] | None:
    """For a caller that sent `Expect: 100-continue`: what sends it the 100 when its body is wanted."""
    expect = request.headers.get("Expect")
    if expect is None or expect.lower() != "100-continue" or request.version < (1, 1):
        return None

    def send_continue() -> None:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.write(CONTINUE)

    return send_continue


# Digits a caller-limit header may have: 10**15 ms is 31,000 years and any count that large
# is capped by the route anyway, while int() and float() of longer text can fail.
_MAX_DIGITS = 15


def _whole_number(name: str, value: str, what: str) -> int:
    """`value` as an int of at least 1; ASCII digits only (str.isdigit() also takes "²" and Arabic-Indic digits)."""
    digits = value.strip()
    if 0 < len(digits) <= _MAX_DIGITS and digits.isascii() and digits.isdigit() and (number := int(digits)) >= 1:
        return number
    shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"
    raise BadRequest(f"{name} must be {what}, in at most {_MAX_DIGITS} ASCII digits; got {shown}")


def attempt_headers(call: Call) -> dict[str, str]:
    return {ATTEMPTS_HEADER: str(call.attempts), UPSTREAM_MS_HEADER: str(round(call.upstream_seconds * 1000))}


def error_headers(route: ActiveRoute, call: Call) -> dict[str, str]:
    """attempt_headers, and x-sidecar-cache on a cached route: the sidecar's own error answers
    carry it too (answers from the upstream or the cache have it already)."""
    headers = attempt_headers(call)
    cache = route.state.cache
    if cache is not None:
        headers[CACHE_HEADER] = cache.error_label(call)
    return headers


class Listener:
    """The request handler of one listening address and the routes it serves."""

    def __init__(
        self, routes: list[ActiveRoute], unmatched: RouteMetrics, access_log: AccessLog, limits: Server
    ) -> None:
        self.table = RouteTable(routes)
        self.limits = limits
        self._unmatched = unmatched
        self.access_log = access_log
        self._loop = asyncio.get_running_loop()
        # While draining, every answer says Connection: close, so callers stop reusing
        # connections before the listener stops accepting.
        self.draining = False
        self.tunnels = Tunnels()  # open WebSocket connections, closed with 1001 at the end of a shutdown

    def update(self, routes: list[ActiveRoute]) -> None:
        """Swap in a reloaded route table at once; requests in flight finish on the one they matched."""
        self.table = RouteTable(routes)

    @property
    def caches(self) -> bool:
        """Whether any of its routes has a cache (proxy/early.py answers fresh hits early then)."""
        return self.table.caches

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Admit, match, run the route's stack, answer; the exchange is recorded once at the end."""
        exchange = Exchange(request_id_of(request.headers), request.method, request.raw_path, self._loop.time())
        refused = refusal(request, exchange.path, self.limits)
        # The Host header as sent: when it is missing (HTTP/1.0), aiohttp's request.host
        # falls back to our own listening address, which a host route could match.
        route = self.table.match(request.headers.get("Host", ""), exchange.path) if refused is None else None
        if route is None:
            return self._unrouted(request, exchange, refused)
        metrics = route.state.metrics
        metrics.started()
        exchange.route = route.spec.name
        call = self._call(request, route, exchange.request_id)
        try:
            return await self._answer(request, route, call, exchange)
        except asyncio.CancelledError:
            exchange.status, exchange.error = CallerGone.status, CallerGone.kind  # the caller hung up
            raise
        finally:
            call.complete()  # a no-op when the relay freed the slot already
            metrics.ended()
            exchange.duration = self._loop.time() - exchange.started
            metrics.answered(exchange.method, exchange.status, exchange.duration)
            if self.access_log.enabled:  # the rest is for its line only: not paid with the log off
                exchange.upstream_seconds, exchange.attempts = call.upstream_seconds, call.attempts
                exchange.endpoint = call.endpoint.base if call.endpoint else None
                breaker = route.state.breaker
                exchange.breaker = breaker.state if breaker else None
                self.access_log.record(exchange)

    def _unrouted(self, request: web.BaseRequest, exchange: Exchange, refused: SidecarError | None) -> web.Response:
        """A request refused by the request checks, or matching no route: never forwarded."""
        error = refused or NoRoute(f"no route matches {request.method} {request.path}")
        exchange.status, exchange.error = error.status, error.kind
        exchange.duration = self._loop.time() - exchange.started
        self._unmatched.answered(exchange.method, exchange.status, exchange.duration)
        if self.access_log.enabled:
            self.access_log.record(exchange)
        unrouted = error_response(error, None, exchange.request_id)
        if self.draining or refused is not None:
            unrouted.force_close()  # a refused request's framing or intent is in doubt
        return unrouted

    @staticmethod
    def _call(request: web.BaseRequest, route: ActiveRoute, request_id: str) -> Call:
        spec = route.spec
        return Call(
            method=request.method,
            target=upstream_target(spec, request.raw_path),
            headers=upstream_request_headers(request.headers, request.remote, request.scheme, request_id),
            body=CallerBody(
                request.content, spec.timeouts.idle, spec.limits.max_body, continue_sender(request)
            ) if request.body_exists else None,
        )

    async def _answer(
        self, request: web.BaseRequest, route: ActiveRoute, call: Call, exchange: Exchange
    ) -> web.StreamResponse:
        """Admission (what the stack's docstring lists before the layers), then the stack, then the relay."""
        spec = route.spec
        try:
            admit(request, spec, call)
            if route.queue is not None and route.queue.takes(request.method, request.headers):
                accepted = await route.queue.accept(call)  # stored durably: 202, delivered later
                exchange.status = accepted.status
                if self.draining:
                    accepted.force_close()
                return accepted
            body, length = call.body, request.content_length
            if isinstance(body, CallerBody) and length is not None and length <= spec.retries.max_body:
                # Read whole before taking a slot: a trickling caller holds only its connection.
                call.body = await body.read_small(self.limits.body_timeout)
            upstream = await route.handler(call)
        except SidecarError as error:
            return self._refused(request, route, call, exchange, error)
        except Exception:
            log.exception("unexpected error", extra={"route": spec.name, "request_id": exchange.request_id})
            return self._refused(request, route, call, exchange, SidecarError("the sidecar failed unexpectedly"))
        exchange.status = upstream.status
        if call.upgrade and upstream.status == 101:
            assert isinstance(upstream, UpstreamResponse)  # only the upstream client's connection tunnels
            tunnel = Tunnel(request, upstream, spec.timeouts.idle, route.state.metrics, self.tunnels)
            try:
                return await tunnel.run(exchange.request_id, attempt_headers(call))
            finally:
                exchange.tunnelled = (tunnel.bytes_in, tunnel.bytes_out)
        # An answer that came before the caller's body was all read (a 401 to an upload the
        # upstream never read) is relayed as it is, and the caller's connection closes after
        # it: the rest of that body is not worth reading.
        keep_alive = not self.draining and (call.body is None or request.content.is_eof())
        response, exchange.error = await relay(
            request, upstream, exchange.request_id, spec.timeouts.idle, attempt_headers(call), keep_alive,
            call.complete, self.limits,
        )
        return response

    def _refused(
        self, request: web.BaseRequest, route: ActiveRoute, call: Call, exchange: Exchange, error: SidecarError
    ) -> web.Response:
        """The sidecar's own answer on a route: its error (or the route's fallback while it sheds load)."""
        spec = route.spec
        exchange.error = error.kind
        response = error_response(
            error, spec.name, exchange.request_id, call.attempts, error_headers(route, call), spec.fallback
        )
        exchange.status = response.status
        if self.draining or (call.body is not None and not request.content.is_eof()):
            response.force_close()  # draining, or the rest of the body is not worth reading
        if isinstance(error, RequestBodyTimeout) and isinstance(request.protocol, GuardedHandler):
            request.protocol.close_without_lingering()  # it went silent: nothing more will come
        return response


def admit(request: web.BaseRequest, spec: RouteSpec, call: Call) -> None:
    """What a routed request must pass before its route's stack: the caller's own limits, a
    WebSocket handshake's shape, the body limit. Raises the SidecarError to answer with."""
    call.max_attempts, call.timeout = caller_limits(request.headers)
    call.upgrade = websocket_upgrade(request, spec.websocket, call.headers)
    if spec.limits.max_body is not None and (request.content_length or 0) > spec.limits.max_body:
        raise PayloadTooLarge(f"the request body is larger than {spec.limits.max_body} bytes")
