"""A traffic listener: match the route, run its policy stack, relay the answer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from sidecar.access_log import AccessLog
from sidecar.body import CallerBody, read_small_body
from sidecar.call import Call, Handler
from sidecar.config import RouteSpec
from sidecar.config.schema import Server
from sidecar.errors import (
    BadRequest,
    CallerGone,
    NoRoute,
    PayloadTooLarge,
    RequestBodyTimeout,
    SidecarError,
    error_response,
)
from sidecar.headers import request_id_of, upstream_request_headers
from sidecar.metrics import RouteMetrics
from sidecar.protocol import GuardedHandler
from sidecar.relay import relay
from sidecar.request_checks import refusal
from sidecar.stack import RouteState

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


def host_of(host_header: str) -> str:
    """`Example.COM:8080` -> `example.com`; `[::1]:80` -> `[::1]`."""
    host = host_header.lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


class RouteTable:
    """Longest `path_prefix` wins; at equal length a route with a `host` beats one without."""

    def __init__(self, routes: list[ActiveRoute]) -> None:
        self._routes = sorted(routes, key=lambda r: (len(r.spec.path_prefix), r.spec.host is not None), reverse=True)

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
        if not value.strip().isdigit() or int(value) < 1:
            raise BadRequest(f"{MAX_ATTEMPTS_HEADER} must be a whole number of at least 1, got {value!r}")
        attempts = int(value)
    if (value := headers.get(TIMEOUT_HEADER)) is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise BadRequest(f"{TIMEOUT_HEADER} must be a whole number of milliseconds above 0, got {value!r}")
        timeout = int(value) / 1000
    return attempts, timeout


def attempt_headers(call: Call) -> dict[str, str]:
    return {ATTEMPTS_HEADER: str(call.attempts), UPSTREAM_MS_HEADER: str(round(call.upstream_seconds * 1000))}


class Listener:
    """The request handler of one listening address and the routes it serves."""

    def __init__(
        self, routes: list[ActiveRoute], unmatched: RouteMetrics, access_log: AccessLog, limits: Server
    ) -> None:
        self._table = RouteTable(routes)
        self.limits = limits
        self._unmatched = unmatched
        self._access_log = access_log
        self._loop = asyncio.get_running_loop()
        # While draining, every answer says Connection: close, so callers stop reusing
        # connections before the listener stops accepting.
        self.draining = False

    def update(self, routes: list[ActiveRoute]) -> None:
        """Swap in a reloaded route table at once; requests in flight finish on the one they matched."""
        self._table = RouteTable(routes)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = self._loop.time()
        request_id = request_id_of(request.headers)
        raw_path = request.raw_path
        refused = refusal(request, raw_path, self.limits)
        # The Host header as sent: when it is missing (HTTP/1.0), aiohttp's request.host
        # falls back to our own listening address, which a host route could match.
        host = request.headers.get("Host", "")
        route = self._table.match(host, raw_path) if refused is None else None
        if route is None:
            error = refused or NoRoute(f"no route matches {request.method} {request.path}")
            self._unmatched.answered(request.method, error.status, self._loop.time() - started)
            if self._access_log.enabled:
                self._access_log.record(request_id, None, request.method, raw_path, error.status,
                                        self._loop.time() - started, 0.0, 0, None, None, error.kind)
            unrouted = error_response(error, None, request_id)
            if self.draining or refused is not None:
                unrouted.force_close()  # a refused request's framing or intent is in doubt
            return unrouted
        metrics = route.state.metrics
        metrics.started()
        status = 500
        error_kind: str | None = None
        spec = route.spec
        call = Call(
            method=request.method,
            target=upstream_target(spec, raw_path),
            headers=upstream_request_headers(request.headers, request.remote, request.scheme, request_id),
            body=CallerBody(request.content, spec.timeouts.idle, spec.limits.max_body) if request.body_exists else None,
        )
        try:
            try:
                call.max_attempts, call.timeout = caller_limits(request.headers)
                if spec.limits.max_body is not None and (request.content_length or 0) > spec.limits.max_body:
                    raise PayloadTooLarge(f"the request body is larger than {spec.limits.max_body} bytes")
                length = request.content_length if call.body is not None else None
                if length is not None and length <= spec.retries.max_body:
                    # Read whole before taking a slot: a trickling caller holds only its connection.
                    call.body = await read_small_body(request.content, self.limits.body_timeout)
                upstream = await route.handler(call)
            except SidecarError as error:
                error_kind = error.kind
                response = error_response(
                    error, spec.name, request_id, call.attempts, attempt_headers(call), spec.fallback
                )
                status = response.status
                if self.draining or (call.body is not None and not request.content.is_eof()):
                    response.force_close()  # draining, or the rest of the body is not worth reading
                if isinstance(error, RequestBodyTimeout) and isinstance(request.protocol, GuardedHandler):
                    request.protocol.close_without_lingering()  # it went silent: nothing more will come
                return response
            except Exception:
                log.exception("unexpected error", extra={"route": spec.name, "request_id": request_id})
                error_kind = SidecarError.kind
                internal = SidecarError("the sidecar failed unexpectedly")
                return error_response(internal, spec.name, request_id, call.attempts, attempt_headers(call))
            status = upstream.status
            return await relay(
                request, upstream, request_id, spec.timeouts.idle, attempt_headers(call), not self.draining,
                call.complete, self.limits,
            )
        except asyncio.CancelledError:
            status, error_kind = CallerGone.status, CallerGone.kind  # the caller hung up
            raise
        finally:
            call.complete()  # a no-op when the relay freed the slot already
            metrics.ended()
            duration = self._loop.time() - started
            metrics.answered(request.method, status, duration)
            if self._access_log.enabled:
                breaker = route.state.breaker
                self._access_log.record(
                    request_id, spec.name, request.method, raw_path, status, duration, call.upstream_seconds,
                    call.attempts, call.endpoint.base if call.endpoint else None,
                    breaker.state if breaker else None, error_kind,
                )
