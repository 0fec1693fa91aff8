"""The loaded config: immutable, validated, defaults merged. The hot path reads only these."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from sidecar.config.cache import Cache
from sidecar.config.delivery import DeliveryStore, RouteDelivery
from sidecar.config.schema import (
    CircuitBreaker,
    Fallback,
    Limits,
    Log,
    Outlier,
    Retries,
    Server,
    Shutdown,
)
from sidecar.config.units import Duration


class RouteTimeouts(msgspec.Struct, frozen=True, kw_only=True):
    """A route's `timeouts` as the request path uses them: `per_try`, which a user may leave
    out, is resolved to `total` when the config is loaded."""

    connect: Duration
    per_try: Duration
    total: Duration
    idle: Duration


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream instance; `base` is scheme://host:port plus an optional base path."""

    base: str
    authority: str  # host[:port] as written, sent as the Host header
    # Where to connect, worked out once at load time so no request parses a URL.
    host: str  # without IPv6 brackets
    port: int
    tls: bool
    path: str  # base path prepended to every request target, "" for none
    # Seconds a pooled connection may stay idle (the upstream's keepalive_timeout).
    keepalive: float = 1.5


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    endpoints: tuple[Endpoint, ...]
    outlier: Outlier


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    listen: Address
    host: str | None  # lower-case, without port; None matches any host
    path_prefix: str
    strip_prefix: bool
    upstream: UpstreamSpec
    timeouts: RouteTimeouts
    retries: Retries
    circuit_breaker: CircuitBreaker
    limits: Limits
    fallback: Fallback | None
    websocket: bool = True  # tunnel WebSocket upgrades
    delivery: RouteDelivery | None = None  # queued: accepted with 202, delivered later
    cache: Cache | None = None  # the route's response cache (docs/cache.md); None: off


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin_listen: Address
    admin_token: str | None
    metrics_listen: Address | None
    log: Log
    shutdown: Shutdown
    server: Server
    upstreams: tuple[UpstreamSpec, ...]
    routes: tuple[RouteSpec, ...]
    # Values that came from secret-named environment variables: redacted wherever shown.
    secrets: frozenset[str] = frozenset()
    delivery: DeliveryStore = field(default_factory=DeliveryStore)  # where queued routes keep their messages

    @property
    def listeners(self) -> tuple[Address, ...]:
        """Every traffic listener: the shared one first, then dedicated route ports."""
        seen = [self.listen]
        for route in self.routes:
            if route.listen not in seen:
                seen.append(route.listen)
        return tuple(seen)
