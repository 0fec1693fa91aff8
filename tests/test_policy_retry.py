"""The retry decision as a pure function: every skip reason, the backoff, Retry-After, the deadline."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from sidecar.config.schema import Backoff, Retries
from sidecar.policy.retry import Retry, Skip, decide, retry_after_seconds
from sidecar.policy.retry_budget import RetryBudget
from tests.helpers import FakeClock

WALL = 1_795_000_000.0
POLICY = Retries(attempts=3, backoff=Backoff(base=0.1, max=0.3), retry_after_max=2.0)


def high(low: float, high: float) -> float:
    """A jitter that always draws the top of its range, so waits are exact."""
    return high


def ample_budget() -> RetryBudget:
    return RetryBudget(ratio=0.2, min_per_second=10, clock=FakeClock())


def ask(condition: str = "503", policy: Retries = POLICY, **overrides: Any) -> Retry | Skip:
    arguments: dict[str, Any] = {
        "retries": 0, "attempts": 1, "max_attempts": 3, "method": "GET", "idempotency_key": False,
        "body_replayable": True, "retry_after": None, "now": 50.0, "deadline": 65.0, "wall_now": WALL,
        "budget": ample_budget(), "jitter": high,
    }
    arguments.update(overrides)
    return decide(policy, condition, **arguments)


def test_a_listed_failure_with_everything_in_order_is_retried_after_the_backoff() -> None:
    assert ask() == Retry(0.1)


def test_backoff_doubles_per_retry_up_to_its_cap() -> None:
    assert [ask(retries=n, attempts=1) for n in range(4)] == [Retry(0.1), Retry(0.2), Retry(0.3), Retry(0.3)]


def test_jitter_draws_between_zero_and_the_backoff() -> None:
    draws: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        draws.append((low, high))
        return 0.05

    assert ask(retries=1, jitter=record) == Retry(0.05)
    assert draws == [(0.0, 0.2)]


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"attempts": 3}, "attempts_exhausted"),
    ({"attempts": 2, "max_attempts": 2}, "attempts_exhausted"),  # the caller's x-sidecar-max-attempts
    ({"method": "POST"}, "non_idempotent"),
    ({"method": "PATCH"}, "non_idempotent"),
    ({"body_replayable": False}, "body_too_large"),
    ({"retry_after": "3"}, "retry_after_too_long"),
    ({"deadline": 50.1}, "deadline"),  # the wait would end exactly at the deadline
    ({"budget": RetryBudget(ratio=0.0, min_per_second=0.0, clock=FakeClock())}, "budget"),
])
def test_every_skip_reason(overrides: dict[str, Any], reason: str) -> None:
    assert ask(**overrides) == Skip(reason)


def test_skip_reasons_are_checked_in_their_documented_order() -> None:
    empty = RetryBudget(ratio=0.0, min_per_second=0.0, clock=FakeClock())
    everything = {"attempts": 3, "method": "POST", "body_replayable": False, "retry_after": "9",
                  "deadline": 50.0, "budget": empty}
    order = ["attempts_exhausted", "non_idempotent", "body_too_large", "retry_after_too_long", "deadline", "budget"]
    fixes = [{"attempts": 1}, {"method": "GET"}, {"body_replayable": True}, {"retry_after": None},
             {"deadline": 65.0}, {"budget": ample_budget()}]
    for reason, fix in zip(order, fixes, strict=True):
        assert ask(**everything) == Skip(reason)
        everything.update(fix)
    assert ask(**everything) == Retry(0.1)


@pytest.mark.parametrize(("method", "condition", "extra"), [
    ("POST", "connect-failure", {}),  # provably never sent
    ("POST", "503", {"idempotency_key": True}),
    ("POST", "reset", {"policy": Retries(attempts=3, non_idempotent=True)}),
    ("DELETE", "timeout", {}),
])
def test_when_a_non_idempotent_method_may_be_retried(method: str, condition: str, extra: dict[str, Any]) -> None:
    assert isinstance(ask(condition, method=method, **extra), Retry)


def test_retry_after_seconds_replaces_the_backoff_on_429_and_503_only() -> None:
    assert ask("503", retry_after="2") == Retry(2.0)
    assert ask("429", retry_after=" 1 ") == Retry(1.0)
    assert ask("502", retry_after="2") == Retry(0.1)  # only 429 and 503 carry a meaningful Retry-After
    assert ask("503", retry_after="soon") == Retry(0.1)  # unreadable: the backoff


def test_retry_after_date_is_measured_from_the_wall_clock() -> None:
    in_one_second = format_datetime(datetime.fromtimestamp(WALL + 1, UTC), usegmt=True)
    assert ask("503", retry_after=in_one_second) == Retry(1.0)
    in_a_minute = format_datetime(datetime.fromtimestamp(WALL + 60, UTC), usegmt=True)
    assert ask("503", retry_after=in_a_minute) == Skip("retry_after_too_long")
    past = format_datetime(datetime.fromtimestamp(WALL - 60, UTC), usegmt=True)
    assert ask("503", retry_after=past) == Retry(0.0)


def test_a_retry_after_that_outlasts_the_deadline_is_skipped_for_the_deadline() -> None:
    assert ask("503", retry_after="2", now=50.0, deadline=51.0) == Skip("deadline")


def test_retry_after_parsing() -> None:
    assert retry_after_seconds(None, WALL) is None
    assert retry_after_seconds("", WALL) is None
    assert retry_after_seconds("120", WALL) == 120.0
    assert retry_after_seconds("-1", WALL) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", WALL) == 0.0  # long past
