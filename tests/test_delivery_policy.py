"""The delivery schedule on a fake clock: what each outcome leads to, and when the next attempt is."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from sidecar.config.delivery import DeliveryStore, RouteDelivery, lease_of
from sidecar.config.units import decode_hook
from sidecar.delivery.model import Decision, Message, Outcome, Schedule, Verdict, classify, new_id, new_message


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(**values: object) -> RouteDelivery:
    return msgspec.convert(values, RouteDelivery, strict=False, dec_hook=decode_hook)


def queued(attempts: int = 0, queued_at: float = 1000.0) -> Message:
    message = new_message(route="r", method="POST", target="/", headers=(), body=b"", idempotency_key=None,
                          now=queued_at)
    return dataclasses.replace(message, attempts=attempts)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(Outcome(status=status)) is Verdict.DELIVERED


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_not_now_statuses_are_retried(status: int) -> None:
    assert classify(Outcome(status=status)) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 301, 302, 304, 100])
def test_other_statuses_are_dead_at_once(status: int) -> None:
    assert classify(Outcome(status=status)) is Verdict.DEAD


@pytest.mark.parametrize("error", ["connect_failure", "upstream_reset", "timeout", "circuit_open", "overloaded",
                                   "bad_upstream_response", "something_new"])
def test_failures_without_a_response_are_retried(error: str) -> None:
    assert classify(Outcome(error=error)) is Verdict.RETRY


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    top = Schedule(policy(backoff={"base": "1s", "max": "5m"}), random=lambda: 1.0)
    assert [top.backoff(attempts) for attempts in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert top.backoff(10**6) == 300  # no float overflow however many attempts
    assert Schedule(policy(), random=lambda: 0.0).backoff(5) == 0.0
    assert Schedule(policy(), random=lambda: 0.25).backoff(3) == 1.0


def test_retry_after_is_honoured_up_to_max() -> None:
    schedule = Schedule(policy(backoff={"base": "1s", "max": "5m"}), random=lambda: 1.0)
    assert schedule.backoff(1, retry_after=42.0) == 42.0
    assert schedule.backoff(1, retry_after=3600.0) == 300.0
    assert schedule.backoff(1, retry_after=-5.0) == 0.0


def test_a_retried_attempt_counts_and_waits_from_the_clock() -> None:
    clock = FakeClock(5000.0)
    schedule = Schedule(policy(), clock=clock, random=lambda: 0.5)
    decision = schedule.decide(queued(attempts=2), Outcome(status=503))
    assert decision.verdict is Verdict.RETRY and decision.attempts == 3
    assert decision.next_attempt_at == 5000.0 + 0.5 * 4  # third attempt: cap 1s * 2^2

    clock.now = 6000.0
    later = schedule.decide(queued(attempts=2), Outcome(status=429, retry_after=30.0))
    assert later.next_attempt_at == 6030.0


def test_delivered_and_rejected_end_at_once() -> None:
    schedule = Schedule(policy(), clock=FakeClock())
    assert schedule.decide(queued(attempts=4), Outcome(status=201)) == Decision(Verdict.DELIVERED, 5)
    rejected = schedule.decide(queued(), Outcome(status=400))
    assert (rejected.verdict, rejected.attempts, rejected.dead_reason) == (Verdict.DEAD, 1, "rejected")


def test_the_last_allowed_attempt_failing_makes_it_dead() -> None:
    schedule = Schedule(policy(max_attempts=3), clock=FakeClock(), random=lambda: 0.0)
    assert schedule.decide(queued(attempts=1), Outcome(error="timeout")).verdict is Verdict.RETRY
    dead = schedule.decide(queued(attempts=2), Outcome(error="timeout"))
    assert (dead.verdict, dead.attempts, dead.dead_reason) == (Verdict.DEAD, 3, "max_attempts")


def test_an_open_breaker_spends_no_attempt() -> None:
    clock = FakeClock(2000.0)
    schedule = Schedule(policy(max_attempts=1, backoff={"base": "2s", "max": "1m"}), clock=clock)
    told = schedule.decide(queued(attempts=0), Outcome(error="circuit_open", retry_after=12.0))
    assert (told.verdict, told.attempts, told.next_attempt_at) == (Verdict.RETRY, 0, 2012.0)
    untold = schedule.decide(queued(attempts=0), Outcome(error="circuit_open"))
    assert (untold.verdict, untold.attempts, untold.next_attempt_at) == (Verdict.RETRY, 0, 2002.0)


def test_ttl_counts_from_queueing_and_a_retry_past_it_is_dead() -> None:
    clock = FakeClock(1000.0)
    schedule = Schedule(policy(ttl="1h", backoff={"base": "1m", "max": "1m"}), clock=clock, random=lambda: 1.0)
    message = queued(attempts=1, queued_at=1000.0)
    clock.now = 1000.0 + 3600 - 61
    assert not schedule.expired(message)
    assert schedule.decide(message, Outcome(status=500)).verdict is Verdict.RETRY
    clock.now = 1000.0 + 3600 - 59  # the next attempt would come after the ttl
    expired = schedule.decide(message, Outcome(status=500))
    assert (expired.verdict, expired.dead_reason) == (Verdict.DEAD, "expired")
    clock.now = 1000.0 + 3600
    assert schedule.expired(message)
    # A redriven message starts a fresh ttl.
    assert not schedule.expired(dataclasses.replace(message, queued_at=clock.now))


def test_ids_sort_in_creation_order_and_never_repeat() -> None:
    same_millisecond = [new_id(1234.5) for _ in range(1000)]
    assert same_millisecond == sorted(same_millisecond) and len(set(same_millisecond)) == 1000
    assert new_id(1300.0) > same_millisecond[-1]
    assert all(len(found) == 32 and int(found, 16) >= 0 for found in same_millisecond)


def test_a_message_without_a_key_uses_its_id_as_key() -> None:
    without = new_message(route="r", method="POST", target="/", headers=(), body=b"abc", idempotency_key=None,
                          now=1.0)
    assert without.idempotency_key == without.id and without.size == 3
    given = new_message(route="r", method="POST", target="/", headers=(), body=b"", idempotency_key="k", now=1.0)
    assert given.idempotency_key == "k"


def test_route_delivery_defaults_and_units() -> None:
    defaults = policy()
    assert (defaults.mode, defaults.methods, defaults.max_body, defaults.max_attempts) == (
        "always", ("POST", "PUT", "PATCH", "DELETE"), 1024 * 1024, 20
    )
    assert (defaults.ttl, defaults.backoff.base, defaults.backoff.max, defaults.concurrency) == (86400, 1, 300, 1)
    assert (defaults.retention, defaults.dedupe_window) == (3600, 86400)
    assert (lease_of(defaults, total=15.0), lease_of(policy(lease="3s"), total=1.0)) == (40.0, 3.0)
    custom = policy(mode="on_request", methods=["POST"], max_bytes="64MiB", backoff={"base": "250ms"})
    assert custom.max_bytes == 64 * 1024 * 1024 and custom.backoff.base == 0.25 and custom.backoff.max == 300
    for wrong in ({"methods": ["post"]}, {"concurrency": 0}, {"mode": "sometimes"}, {"retries": 3}):
        with pytest.raises(msgspec.ValidationError):
            policy(**wrong)


def test_store_spec_is_sqlite_or_a_redis_url() -> None:
    def store(spec: str) -> str:
        return msgspec.convert({"store": spec}, DeliveryStore).store

    assert msgspec.convert({}, DeliveryStore).store == "sqlite"
    assert store("redis://10.0.0.5:6379/2") == "redis://10.0.0.5:6379/2"
    assert store("rediss://cache:6380/0") == "rediss://cache:6380/0"
    for wrong in ("postgres://db", "redis:/x", "SQLite", ""):
        with pytest.raises(msgspec.ValidationError):
            store(wrong)
