"""A route's policy stack, built in one place, outermost layer first.

Every policy a request meets, in order:

    admission (listener.py)   request checks (wire/request_checks.py: versions, codings, paths,
                              never an open proxy) -> route match -> the caller's own limits
                              (x-sidecar-*) -> WebSocket handshake shape -> limits.max_body ->
                              [delivery: stored and answered 202, delivered later by the queue]
                              -> a body that fits retries.max_body read whole (server.body_timeout)
    the stack (here)          cache -> deadline -> limit -> retry -> circuit breaker -> forward

Admission runs before any layer because nothing it refuses should cost a concurrency slot or a
retry budget. A disabled policy is a passthrough, so every route's stack has the same shape.

One shortcut, on listeners with a cached route only: a plain GET that is a fresh hit is
answered as soon as it is parsed (proxy/early.py), after the same request checks, route match
and cache decision as above, and before admission builds anything; the rest of the list has
nothing to do for it. Whatever it declines comes down this list as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.cache.layer import RouteCache, cache_layer
from sidecar.config import RouteSpec
from sidecar.layers.breaker import RouteBreaker, breaker_layer
from sidecar.layers.deadline import deadline_layer
from sidecar.layers.limit import Bulkhead, limit_layer
from sidecar.layers.retry import retry_layer
from sidecar.policy.retry_budget import RetryBudget
from sidecar.proxy.call import Handler, Layer
from sidecar.proxy.endpoints import EndpointPool
from sidecar.proxy.forward import forwarder
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import RouteMetrics
from sidecar.wire.upstream_client import UpstreamClient


@dataclass(frozen=True, slots=True)
class RouteState:
    """What a route's layers remember between requests: counters, budgets, breaker state."""

    metrics: RouteMetrics
    endpoints: EndpointPool  # shared by every route of the upstream
    bulkhead: Bulkhead
    budget: RetryBudget
    breaker: RouteBreaker | None  # None when circuit_breaker.enabled is false
    events: EventBus
    cache: RouteCache | None = None  # None when the route has no `cache:`


def new_route_state(
    route: RouteSpec, metrics: RouteMetrics, endpoints: EndpointPool, clock: Callable[[], float], events: EventBus,
    wall_clock: Callable[[], float] = time.time,
) -> RouteState:
    """`clock` is the event loop's; `wall_clock` is for the cache, whose ages meet Date headers."""
    budget = route.retries.budget
    breaker = route.circuit_breaker
    cache = None
    if route.cache is not None:
        cache = RouteCache(route.name, route.cache, route.timeouts.total, route.timeouts.idle, wall_clock)
        cache.on_result = metrics.cache_result
    return RouteState(
        metrics=metrics,
        endpoints=endpoints,
        bulkhead=Bulkhead(route.name, route.limits, metrics, events),
        budget=RetryBudget(budget.ratio, budget.min_per_second, clock),
        breaker=RouteBreaker(route.name, breaker, metrics, clock, events) if breaker.enabled else None,
        events=events,
        cache=cache,
    )


def route_stack(route: RouteSpec, client: UpstreamClient, state: RouteState) -> Handler:
    layers: list[Layer] = [
        # The cache first: a fresh hit needs no deadline, slot, retry or breaker, and a stale
        # entry may only answer for a failure once it is final (after retries, breaker, limit).
        cache_layer(state.cache),
        # One deadline for the whole request from its arrival, so neither the wait for a slot
        # nor retries can stretch a caller's wait. A stamp, not a timer: free when unused.
        deadline_layer(route.timeouts),
        # Bulkhead outside retries: a request holds one slot across all its attempts.
        limit_layer(state.bulkhead),
        # Retries sit outside the breaker: every attempt is seen and counted by it.
        retry_layer(route.name, route.retries, state.budget, state.metrics, state.events),
        # Fail fast without touching the network while the upstream is known broken.
        breaker_layer(state.breaker),
    ]
    handler = forwarder(route, client, state.endpoints, state.metrics)
    for layer in reversed(layers):
        handler = layer(handler)
    return handler
