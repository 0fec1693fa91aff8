"""Prometheus metrics. One `Metrics` per sidecar, on a registry passed in (tests build many).

Label values stay bounded: route names from the config and a fixed method set, never raw paths.
The catalogue with meanings and example queries is in docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.wire.tallies import HistogramTally

K = TypeVar("K", bound=Hashable)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
NO_ROUTE = "_no_route"  # route label of requests that matched no route (names cannot start with "_")
BREAKER_STATES = ("closed", "open", "half_open")
# With several workers, how often each folds its tallies into the shared files: a scrape
# answered by one worker sees the others at most this far behind.
FLUSH_SECONDS = 1.0
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._routes: dict[str, RouteMetrics] = {}
        registry.register(_FlushFirst(self))  # before every metric: collection runs in this order
        self.requests = Counter(
            "sidecar_requests", "Requests answered, by route, method and response status code.",
            ["route", "method", "code"], registry=registry,
        )
        self.duration = Histogram(
            "sidecar_request_duration_seconds", "Time from request received to response complete.",
            ["route"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests", "Requests being handled now.", ["route"], registry=registry,
            multiprocess_mode="livesum",
        )
        self.websocket_connections = Gauge(
            "sidecar_websocket_connections", "WebSocket connections open now (after the upstream's 101).", ["route"],
            registry=registry, multiprocess_mode="livesum",
        )
        self.attempts = Counter(
            "sidecar_upstream_attempts", "Attempts sent upstream, by outcome.", ["route", "outcome"], registry=registry,
        )
        self.attempt_duration = Histogram(
            "sidecar_upstream_attempt_duration_seconds", "Time of one attempt, until response headers or failure.",
            ["route"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.retries = Counter(
            "sidecar_retries", "Retries made, by the condition that caused them.", ["route", "reason"],
            registry=registry,
        )
        self.retries_skipped = Counter(
            "sidecar_retries_skipped", "Failed attempts that were not retried, by why not.", ["route", "reason"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "sidecar_circuit_breaker_state", "1 for the breaker's current state (closed, open, half_open), else 0.",
            ["route", "state"], registry=registry,
            multiprocess_mode="liveall",  # per worker: each has its own breakers and pools
        )
        self.breaker_transitions = Counter(
            "sidecar_circuit_breaker_transitions", "Breaker state changes, by the state entered.", ["route", "to"],
            registry=registry,
        )
        self.breaker_rejections = Counter(
            "sidecar_circuit_breaker_rejections", "Requests failed fast because the breaker was open.", ["route"],
            registry=registry,
        )
        self.limit_rejections = Counter(
            "sidecar_limit_rejections", "Requests refused by the route's concurrency limit, by which limit.",
            ["route", "limit"], registry=registry,
        )
        self.endpoint_ejected = Gauge(
            "sidecar_upstream_endpoint_ejected", "1 while the endpoint is ejected from the rotation.",
            ["upstream", "endpoint"], registry=registry,
            multiprocess_mode="liveall",  # per worker: each has its own breakers and pools
        )
        self.endpoint_ejections = Counter(
            "sidecar_upstream_endpoint_ejections", "Times the endpoint was ejected.", ["upstream", "endpoint"],
            registry=registry,
        )
        self.breaker_forced = Gauge(
            "sidecar_circuit_breaker_forced", "1 while an operator forces the breaker open or closed (admin API).",
            ["route"], registry=registry,
            multiprocess_mode="liveall",  # per worker: each has its own breakers and pools
        )
        self.config_reloads = Counter(
            "sidecar_config_reloads", "Config loads and reloads, by result (success, failure).", ["result"],
            registry=registry,
        )
        self.config_last_success = Gauge(
            "sidecar_config_last_reload_success_timestamp_seconds", "Unix time of the last successful config load.",
            registry=registry, multiprocess_mode="max",
        )
        self.events_dropped = Counter(
            "sidecar_admin_events_dropped", "Events not delivered to a slow /api/v1/events client.",
            registry=registry,
        )
        self.cache_requests = Counter(
            "sidecar_cache_requests", "Answers of cached routes, by how the cache made them (x-sidecar-cache).",
            ["route", "result"], registry=registry,
        )
        self.cache_bytes = Gauge(
            "sidecar_cache_bytes", "Bytes the route's cache holds now, as counted against cache.max_bytes.",
            ["route"], registry=registry, multiprocess_mode="livesum",  # each worker has its own cache
        )
        self.cache_evictions = Counter(
            "sidecar_cache_evictions", "Cache entries dropped to make room for newer ones.", ["route"],
            registry=registry,
        )
        self.connections = ConnectionMetrics(registry)
        self.delivery = DeliveryMetrics(registry)
        build_info = Gauge("sidecar_build_info", "Always 1; the version label says which build runs.",
                           ["version"], registry=registry, multiprocess_mode="max")
        build_info.labels(__version__).set(1)

    def route(self, name: str) -> RouteMetrics:
        """The route's metrics, the same object across reloads: requests that started before
        a reload finish on it, so its in-flight count and tallies stay whole."""
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = RouteMetrics(self, name)
        return route

    def flush(self) -> None:
        """Fold every route's tallies into prometheus-client (done before each collection)."""
        for route in self._routes.values():
            route.flush()


class ConnectionMetrics:
    """What the upstream client did to pooled connections (its ConnectionCounters)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._stale = Counter(
            "sidecar_upstream_stale_connections",
            "Requests on a reused upstream connection that the upstream was closing (idle-timeout races).",
            ["endpoint"], registry=registry,
        )
        self._unsolicited = Counter(
            "sidecar_upstream_unsolicited_closes",
            "Upstream connections closed because bytes arrived that no request asked for.",
            ["endpoint"], registry=registry,
        )

    def stale(self, endpoint: str) -> None:
        self._stale.labels(endpoint).inc()

    def unsolicited(self, endpoint: str) -> None:
        self._unsolicited.labels(endpoint).inc()


class _FlushFirst(Collector):
    """Registered before any metric, so every collection (a scrape, `get_sample_value`)
    first folds the hot-path tallies in and sees them exactly."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return ()


class RouteMetrics:
    """A route's metric children, resolved once so the hot path skips label lookups.

    The four series every request touches (requests, request duration, attempts, attempt
    duration) and the in-flight gauge are tallied in plain Python and folded into
    prometheus-client when metrics are collected: its inc() and observe() cost about a
    microsecond each, six per request (with several workers, eight writes to memory-mapped
    files, 11 us). With several workers a scrape reads every worker's files, so each worker
    also folds its tallies in every FLUSH_SECONDS (server.py). The rarer series (breaker,
    limits, retries) go straight to prometheus-client.
    """

    __slots__ = (
        "_answered", "_attempt_children", "_attempt_duration", "_attempts", "_cache_children", "_cache_figures",
        "_cache_results", "_duration", "_evictions_seen", "_in_flight_gauge", "_metrics", "_name",
        "_request_children", "_websocket_gauge", "in_flight",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self.in_flight = 0  # requests of this route being handled now: started() to ended()
        self._answered: dict[tuple[str, int], int] = {}
        self._attempts: dict[str, int] = {}
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._attempt_children: dict[str, Counter] = {}
        self._duration = HistogramTally(metrics.duration.labels(name))
        self._attempt_duration = HistogramTally(metrics.attempt_duration.labels(name))
        self._in_flight_gauge = metrics.in_flight.labels(name)
        self._websocket_gauge = metrics.websocket_connections.labels(name)  # every route shows 0 from the start
        # Cached routes only: answers by x-sidecar-cache label, tallied like the requests, and
        # the cache's (bytes, evictions so far), read when metrics are collected.
        self._cache_results: dict[str, int] = {}
        self._cache_children: dict[str, Counter] = {}
        self._cache_figures: Callable[[], tuple[int, int]] | None = None
        self._evictions_seen = 0

    def started(self) -> None:
        self.in_flight += 1

    def ended(self) -> None:
        self.in_flight -= 1

    def answered(self, method: str, code: int, seconds: float) -> None:
        # Keyed by the label, not the method: callers can invent any number of methods.
        key = (method if method in METHODS else "OTHER", code)
        answered = self._answered
        answered[key] = answered.get(key, 0) + 1
        self._duration.observe(seconds)

    def attempt(self, outcome: str, seconds: float) -> None:
        """outcome: success, failure_status (5xx), connect_failure, reset, timeout or bad_response."""
        attempts = self._attempts
        attempts[outcome] = attempts.get(outcome, 0) + 1
        self._attempt_duration.observe(seconds)

    def flush(self) -> None:
        _fold(self._answered, self._request_children,
              lambda key: self._metrics.requests.labels(self._name, key[0], str(key[1])))
        _fold(self._attempts, self._attempt_children,
              lambda outcome: self._metrics.attempts.labels(self._name, outcome))
        self._duration.flush()
        self._attempt_duration.flush()
        self._in_flight_gauge.set(self.in_flight)
        if self._cache_results:
            _fold(self._cache_results, self._cache_children,
                  lambda label: self._metrics.cache_requests.labels(self._name, label.lower()))
        if self._cache_figures is not None:
            held, evictions = self._cache_figures()
            self._metrics.cache_bytes.labels(self._name).set(held)
            if evictions > self._evictions_seen:
                self._metrics.cache_evictions.labels(self._name).inc(evictions - self._evictions_seen)
            self._evictions_seen = evictions

    def cache_result(self, label: str) -> None:
        """An answer of the route's cache; label: an x-sidecar-cache value (MISS, HIT, ...)."""
        results = self._cache_results
        results[label] = results.get(label, 0) + 1

    def cache_watched(self, figures: Callable[[], tuple[int, int]] | None) -> None:
        """The route's cache from now on: what tells its (bytes held, evictions so far), or None
        when the route has no cache any more (its bytes then show 0). A new cache counts its
        evictions from 0."""
        if figures is not None:
            self._metrics.cache_evictions.labels(self._name)  # 0 from the start, like the bytes
            self._metrics.cache_bytes.labels(self._name)
        elif self._cache_figures is not None:
            self._metrics.cache_bytes.labels(self._name).set(0)
        self._cache_figures = figures
        self._evictions_seen = 0

    def retried(self, reason: str) -> None:
        self._metrics.retries.labels(self._name, reason).inc()

    def retry_skipped(self, reason: str) -> None:
        self._metrics.retries_skipped.labels(self._name, reason).inc()

    def breaker_entered(self, state: str) -> None:
        """state: closed, open or half_open."""
        for name in BREAKER_STATES:
            self._metrics.breaker_state.labels(self._name, name).set(1 if name == state else 0)

    def breaker_transition(self, state: str) -> None:
        self._metrics.breaker_transitions.labels(self._name, state).inc()
        self.breaker_entered(state)

    def breaker_forced(self, forced: bool) -> None:
        self._metrics.breaker_forced.labels(self._name).set(1 if forced else 0)

    def breaker_rejected(self) -> None:
        self._metrics.breaker_rejections.labels(self._name).inc()

    def limit_rejected(self, limit: str) -> None:
        self._metrics.limit_rejections.labels(self._name, limit).inc()

    def websocket_opened(self) -> None:
        self._websocket_gauge.inc()

    def websocket_closed(self) -> None:
        self._websocket_gauge.dec()


def _fold(tallies: dict[K, int], children: dict[K, Counter], child_of: Callable[[K], Counter]) -> None:
    """Add each tally to its counter child (looked up once per label set), and start the tallies again."""
    for key, count in tallies.items():
        child = children.get(key)
        if child is None:
            child = children[key] = child_of(key)
        child.inc(count)
    tallies.clear()


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR, set by the supervisor of several workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def multiprocess_registry(metrics: Metrics) -> CollectorRegistry | None:
    """With several workers (PROMETHEUS_MULTIPROC_DIR set), a registry that sums every worker's files,
    this worker's tallies folded in first."""
    if multiprocess_dir() is None:
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    registry.register(_FlushFirst(metrics))
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class DeliveryMetrics:
    """Durable delivery: the queue's content (read from the store, shared by every worker) and outcomes."""

    OUTCOMES = ("delivered", "retried", "dead", "deduplicated")

    def __init__(self, registry: CollectorRegistry) -> None:
        # Every worker reads the same store: the most recent reading is the truth, not a sum.
        self.messages = Gauge(
            "sidecar_queue_messages", "Stored delivery messages, by route and status (queued, delivering, "
            "delivered, dead).", ["route", "status"], registry=registry, multiprocess_mode="livemostrecent",
        )
        self.oldest_age = Gauge(
            "sidecar_queue_oldest_age_seconds", "Seconds since the oldest undelivered (queued or delivering) "
            "message entered the queue; 0 when none.", ["route"], registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.bytes = Gauge(
            "sidecar_queue_bytes", "Bodies of queued, delivering and dead messages, in bytes (against max_bytes).",
            ["route"], registry=registry, multiprocess_mode="livemostrecent",
        )
        self.deliveries = Counter(
            "sidecar_deliveries", "Delivery decisions and accepts, by outcome: delivered, retried, dead, "
            "deduplicated (an accept whose Idempotency-Key was already stored).", ["route", "outcome"],
            registry=registry,
        )

    def outcome(self, route: str, outcome: str) -> None:
        self.deliveries.labels(route, outcome).inc()

    def queue(self, route: str, counts: dict[str, int], size: int, oldest_age: float) -> None:
        for status, count in counts.items():
            self.messages.labels(route, status).set(count)
        self.bytes.labels(route).set(size)
        self.oldest_age.labels(route).set(oldest_age)

    def forget(self, route: str, statuses: Iterable[str]) -> None:
        """A route that no longer queues: its gauges go away rather than freeze."""
        for status in statuses:
            _remove(self.messages, route, status)
        _remove(self.bytes, route)
        _remove(self.oldest_age, route)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
