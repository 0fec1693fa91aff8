"""Prometheus metrics. One `Metrics` per sidecar, on a registry passed in (tests build many).

Label values stay bounded: route names from the config and a fixed method set, never raw paths.
The catalogue with meanings and example queries is in docs/metrics.md.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar import __version__

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
NO_ROUTE = "_no_route"  # route label of requests that matched no route (names cannot start with "_")
BREAKER_STATES = ("closed", "open", "half_open")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        build_info = Gauge("sidecar_build_info", "Always 1; the version label says which build runs.",
                           ["version"], registry=registry, multiprocess_mode="max")
        build_info.labels(__version__).set(1)

    def route(self, name: str) -> RouteMetrics:
        return RouteMetrics(self, name)


class RouteMetrics:
    """A route's metric children, resolved once so the hot path skips label lookups."""

    __slots__ = ("_attempts", "_metrics", "_name", "_requests", "attempt_duration", "duration", "in_flight")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self._requests: dict[tuple[str, int], Counter] = {}
        self._attempts: dict[str, Counter] = {}
        self.duration = metrics.duration.labels(name)
        self.in_flight = metrics.in_flight.labels(name)
        self.attempt_duration = metrics.attempt_duration.labels(name)

    def attempt(self, outcome: str, seconds: float) -> None:
        """outcome: success, failure_status (5xx), connect_failure, reset, timeout or bad_response."""
        counter = self._attempts.get(outcome)
        if counter is None:
            counter = self._attempts[outcome] = self._metrics.attempts.labels(self._name, outcome)
        counter.inc()
        self.attempt_duration.observe(seconds)

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

    def answered(self, method: str, code: int, seconds: float) -> None:
        # Keyed by the label, not the method: callers can invent any number of methods.
        key = (method if method in METHODS else "OTHER", code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self._metrics.requests.labels(self._name, key[0], str(code))
        counter.inc()
        self.duration.observe(seconds)


def multiprocess_registry() -> CollectorRegistry | None:
    """With several workers (PROMETHEUS_MULTIPROC_DIR set), a registry that sums every worker's files."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
