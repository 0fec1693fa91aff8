"""The config document's shape: every key a user may write, with its default.

These frozen msgspec Structs are the single source for validation (unknown
keys are errors), for the defaults, and for the published JSON Schema
(`docs/config.schema.json`). Cross-field rules live in `load.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sidecar.config.cache import Cache
from sidecar.config.delivery import DeliveryStore, RouteDelivery
from sidecar.config.units import Duration, Size, duration, size


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Ratio = Annotated[float, Meta(ge=0.0, le=1.0)]
StatusCode = Annotated[int, Meta(ge=100, le=599)]
# A retry condition is a transport failure name or an upstream status code.
RetryOn = Literal["connect-failure", "reset", "timeout"] | StatusCode
# A breaker failure is a transport failure name, "5xx", or a status code.
FailureOn = Literal["connect-failure", "reset", "timeout", "5xx"] | StatusCode


class Timeouts(_Section, frozen=True):
    connect: Duration = duration("1s")
    # None means "same as total"; resolved when the config is loaded (model.RouteTimeouts).
    per_try: Duration | None = None
    total: Duration = duration("15s")
    idle: Duration = duration("5m")


class Backoff(_Section, frozen=True):
    base: Duration = duration("25ms")
    max: Duration = duration("250ms")


class Budget(_Section, frozen=True):
    ratio: Ratio = 0.2
    min_per_second: Annotated[float, Meta(ge=0.0)] = 10.0


class Retries(_Section, frozen=True):
    attempts: Positive = 2
    on: tuple[RetryOn, ...] = ("connect-failure", "reset", 502, 503, 504)
    backoff: Backoff = msgspec.field(default_factory=Backoff)
    budget: Budget = msgspec.field(default_factory=Budget)
    non_idempotent: bool = False
    max_body: Size = size("64KiB")
    retry_after_max: Duration = duration("1s")


class FailureRate(_Section, frozen=True):
    threshold: Ratio = 0.5
    window: Duration = duration("10s")
    min_requests: Positive = 20


class CircuitBreaker(_Section, frozen=True):
    enabled: bool = True
    failure_threshold: Positive = 5
    reset_timeout: Duration = duration("30s")
    success_threshold: Positive = 1
    failure_on: tuple[FailureOn, ...] = ("connect-failure", "reset", "timeout", "5xx")
    failure_rate: FailureRate | None = None


class Limits(_Section, frozen=True):
    max_concurrent: Positive = 100
    max_pending: NonNegative = 0
    queue_timeout: Duration = duration("1s")
    # Largest request body; over it: 413, checked while streaming too. None: no limit.
    max_body: Size | None = None


class Policies(_Section, frozen=True):
    """The policy sections shared by `defaults` and each route."""

    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retries: Retries = msgspec.field(default_factory=Retries)
    circuit_breaker: CircuitBreaker = msgspec.field(default_factory=CircuitBreaker)
    limits: Limits = msgspec.field(default_factory=Limits)


POLICY_SECTIONS: dict[str, type[_Section]] = {
    "timeouts": Timeouts, "retries": Retries, "circuit_breaker": CircuitBreaker, "limits": Limits,
}


class Match(_Section, frozen=True):
    path_prefix: Annotated[str, Meta(pattern=r"^/")] = "/"
    host: str | None = None


class Route(Policies, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    upstream: str
    match: Match | None = None
    listen: str | None = None
    strip_prefix: bool = False
    # Tunnel WebSocket upgrades (Connection: Upgrade, Upgrade: websocket); false: they go on as plain HTTP.
    websocket: bool = True
    fallback: Fallback | None = None
    # Accept writes with 202, store them, deliver them later (docs/delivery.md); None: proxied as usual.
    delivery: RouteDelivery | None = None
    # A shared response cache for this route (docs/cache.md); off unless written.
    cache: Cache | None = None


class Outlier(_Section, frozen=True):
    """Endpoint ejection: an endpoint failing this many attempts in a row leaves the rotation."""

    enabled: bool = True
    consecutive_failures: Positive = 5
    base_ejection: Duration = duration("30s")
    max_ejection_percent: Annotated[int, Meta(ge=0, le=100)] = 50


class Upstream(_Section, frozen=True):
    endpoints: Annotated[list[str], Meta(min_length=1)]
    outlier: Outlier = msgspec.field(default_factory=Outlier)
    # How long an idle pooled connection is kept: below the upstream server's own idle timeout
    # (gunicorn's default is 2s, Node's 5s), so we never send on a connection it is closing.
    # A `Keep-Alive: timeout=N` from the upstream lowers it for that connection.
    keepalive_timeout: Duration = duration("1.5s")


class Fallback(_Section, frozen=True):
    """A canned answer served instead of the JSON error while the breaker is open or the route is full."""

    status: StatusCode = 503
    body: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Admin(_Section, frozen=True):
    listen: str = "127.0.0.1:9901"
    # When set, mutating admin calls need `Authorization: Bearer <token>`. Use ${SIDECAR_ADMIN_TOKEN}.
    token: str | None = None


class MetricsListener(_Section, frozen=True):
    # A second address serving only /metrics, /healthz and /readyz, e.g. 0.0.0.0:9902 so
    # Prometheus and kubelet probes reach the pod IP while the admin API stays on loopback.
    listen: str | None = None


class Server(_Section, frozen=True):
    """Limits of the traffic listeners, against hostile or broken clients."""

    listen_max_connections: Positive = 10_000  # per listener; over it: 503 and close
    header_timeout: Duration = duration("10s")  # from a request's first byte to its last header (slowloris)
    keepalive_timeout: Duration = duration("60s")  # an idle client connection is closed after this
    max_request_line: Size = size("8KiB")  # method, target and version: longer gets 414
    max_header_size: Size = size("8KiB")  # one header line: larger gets 431
    max_headers: Positive = 100  # more gets 431
    # %2F and %5C in a path: keep forwards them as sent; reject answers 400 (Envoy's choice).
    escaped_slashes: Literal["keep", "reject"] = "keep"
    # Header names with `_` (Transfer_Encoding): some servers read them as their `-` twin.
    # allow forwards them; drop removes them on the way upstream; reject answers 400.
    underscore_headers: Literal["allow", "drop", "reject"] = "allow"
    # A request body of at most retries.max_body is read whole before the request takes a
    # concurrency slot; silent this long between reads: 408 and close.
    body_timeout: Duration = duration("15s")
    # A caller that takes no byte of its answer for this long is disconnected.
    send_timeout: Duration = duration("30s")
    # Per connection: a response whose upstream is done frees its slot once at most this much of it waits here.
    response_buffer: Size = size("128KiB")


class Shutdown(_Section, frozen=True):
    drain_delay: Duration = duration("5s")  # keep serving after SIGTERM: the app may still call out
    timeout: Duration = duration("20s")  # then how long in-flight requests may finish


class Log(_Section, frozen=True):
    access: bool = True  # one JSON line per request on stdout
    sample: Ratio = 1.0  # share of requests logged
    query: bool = False  # include the query string in `path` (it may carry secrets)


class Document(_Section, frozen=True):
    listen: str = "127.0.0.1:15001"
    admin: Admin = msgspec.field(default_factory=Admin)
    metrics: MetricsListener = msgspec.field(default_factory=MetricsListener)
    log: Log = msgspec.field(default_factory=Log)
    shutdown: Shutdown = msgspec.field(default_factory=Shutdown)
    server: Server = msgspec.field(default_factory=Server)
    defaults: Policies = msgspec.field(default_factory=Policies)
    upstreams: dict[str, Upstream] = msgspec.field(default_factory=dict)
    routes: list[Route] = msgspec.field(default_factory=list)
    # Where queued routes keep their messages (docs/delivery.md).
    delivery: DeliveryStore = msgspec.field(default_factory=DeliveryStore)
