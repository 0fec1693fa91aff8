"""The breaker adapter's rules on a fake clock: counting, tripping once, probing, forcing."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config.schema import CircuitBreaker, FailureRate
from sidecar.errors import CircuitOpen
from sidecar.layers.breaker import RouteBreaker
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import Metrics
from tests.helpers import FakeClock

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Breaker:
    def __init__(self, policy: CircuitBreaker) -> None:
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        self.events = EventBus(metrics)
        self.breaker = RouteBreaker("r", policy, metrics.route("r"), self.clock, self.events)

    def transitions(self, to: str) -> float:
        value = self.registry.get_sample_value("sidecar_circuit_breaker_transitions_total", {"route": "r", "to": to})
        return value or 0.0

    def attempt(self, failure: str | None) -> None:
        self.breaker.record(failure, self.breaker.admit())


def test_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=3))
    for outcome in ["status_503", "status_503", None, "status_503", "status_503"]:
        b.attempt(outcome)
    assert b.breaker.state == "closed" and b.breaker.storage.counter == 2
    b.attempt("timeout")
    assert b.breaker.state == "open" and b.transitions("open") == 1
    with pytest.raises(CircuitOpen):
        b.breaker.admit()


async def test_both_rules_tripping_on_one_failure_is_one_transition() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=2, failure_rate=FailureRate(threshold=0.5, min_requests=2)))
    with b.events.subscribe() as events:
        b.attempt("reset")
        b.attempt("reset")  # the 2nd consecutive failure and 2 of 2 failed: both rules say open
        assert b.breaker.state == "open"
        assert b.transitions("open") == 1
        published = [await events.next(0) for _ in range(2)]
    assert [event and event["state"] for event in published] == ["open", None]


def test_the_probe_waits_reset_timeout_on_the_injected_clock() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, reset_timeout=30.0))
    b.attempt("status_502")
    b.clock.advance(29.5)
    with pytest.raises(CircuitOpen) as refused:
        b.breaker.admit()
    assert refused.value.retry_after == 1  # whole seconds until the probe, rounded up
    b.clock.advance(0.5)
    assert b.breaker.admit() is True  # the probe
    assert b.breaker.state == "half_open" and b.transitions("half_open") == 1
    with pytest.raises(CircuitOpen):
        b.breaker.admit()  # one probe at a time
    b.breaker.record(None, probe=True)
    assert b.breaker.state == "closed" and b.transitions("closed") == 1
    assert b.breaker.admit() is False


def test_a_failed_probe_reopens_for_another_reset_timeout() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, reset_timeout=10.0))
    b.attempt("status_503")
    b.clock.advance(10)
    b.breaker.record("status_503", b.breaker.admit())
    assert b.breaker.state == "open" and b.transitions("open") == 2
    assert b.breaker.seconds_until_probe() == 10.0


def test_success_threshold_needs_that_many_probes_and_an_abandoned_probe_frees_the_gate() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, reset_timeout=1.0, success_threshold=2))
    b.attempt("reset")
    b.clock.advance(1)
    b.breaker.abandon(b.breaker.admit())  # the caller left: neither success nor failure
    assert b.breaker.state == "half_open"
    b.breaker.record(None, b.breaker.admit())
    assert b.breaker.state == "half_open"
    b.breaker.record(None, b.breaker.admit())
    assert b.breaker.state == "closed"


def test_outcomes_of_attempts_admitted_before_it_opened_are_ignored() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1))
    early = b.breaker.admit()  # in flight while another attempt trips it
    b.attempt("reset")
    b.breaker.record(None, early)
    b.breaker.record("reset", early)
    assert b.breaker.state == "open" and b.transitions("open") == 1 and b.transitions("closed") == 0


def test_forcing_wins_and_release_closes_without_a_closed_to_closed_transition() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=2))
    b.attempt("reset")
    b.breaker.force("open")
    with pytest.raises(CircuitOpen):
        b.breaker.admit()
    b.breaker.force(None)
    assert b.breaker.state == "closed" and b.breaker.storage.counter == 0
    assert b.transitions("closed") == 0  # it never left closed underneath
    b.attempt("reset")
    b.breaker.force("closed")
    b.clock.advance(60)
    assert b.breaker.admit() is False


def test_snapshot_dates_come_from_the_injected_clock() -> None:
    b = Breaker(CircuitBreaker(failure_threshold=1, reset_timeout=30.0))
    b.attempt("status_500")
    b.clock.advance(10)
    snapshot = b.breaker.snapshot()
    assert ISO.match(snapshot["opened_at"]) and ISO.match(snapshot["next_probe_at"])
    opened, probe = (datetime.fromisoformat(snapshot[key]) for key in ("opened_at", "next_probe_at"))
    assert (probe - opened).total_seconds() == pytest.approx(30, abs=0.002)  # 10 s ago + 20 s to go
    assert [failure["kind"] for failure in snapshot["recent_failures"]] == ["status_500"]
    assert ISO.match(snapshot["recent_failures"][0]["time"])
