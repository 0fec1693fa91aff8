"""A route's policy stack, built in one place, outermost layer first.

    match route (proxy.py) -> limit -> deadline -> retry -> circuit breaker -> forward

A disabled policy is a passthrough, so every route's stack has the same shape.
"""

from __future__ import annotations

from aiohttp import ClientSession

from sidecar.call import Handler, Layer
from sidecar.config import RouteSpec
from sidecar.endpoints import RoundRobin
from sidecar.forward import forwarder
from sidecar.layers.breaker import breaker_layer
from sidecar.layers.deadline import deadline_layer
from sidecar.layers.limit import limit_layer
from sidecar.layers.retry import retry_layer
from sidecar.layers.retry_budget import RetryBudget
from sidecar.metrics import RouteMetrics


def route_stack(
    route: RouteSpec, session: ClientSession, endpoints: RoundRobin, budget: RetryBudget, metrics: RouteMetrics
) -> Handler:
    """`endpoints`, `budget` and `metrics` are the route's runtime state, made by the caller."""
    layers: list[Layer] = [
        # Bulkhead first: a request waiting for a slot must not start its deadline or hold retries.
        limit_layer(route.limits),
        # One deadline for the whole request, so retries cannot stretch a caller's wait.
        deadline_layer(route.timeouts),
        # Retries sit outside the breaker: every attempt is seen and counted by it.
        retry_layer(route.retries, budget, metrics),
        # Fail fast without touching the network while the upstream is known broken.
        breaker_layer(route.circuit_breaker),
    ]
    handler = forwarder(route, session, endpoints, metrics)
    for layer in reversed(layers):
        handler = layer(handler)
    return handler
