"""Sliding-window counts on a fake clock: the window itself, the retry budget, the failure rate."""

from __future__ import annotations

from sidecar.config.schema import FailureRate
from sidecar.policy.failure_rate import FailureRateWindow
from sidecar.policy.retry_budget import RetryBudget
from sidecar.policy.window import SlidingWindow
from tests.helpers import FakeClock


def test_window_counts_the_last_span_to_one_bucket() -> None:
    clock = FakeClock(100.0)
    window = SlidingWindow(span=10, buckets=10, clock=clock)
    window.add()
    window.add(2)
    clock.advance(5)
    window.add()
    assert window.total() == 4
    clock.advance(4.99)  # 109.99: the bucket of 100 is still the window's oldest
    assert window.total() == 4
    clock.advance(0.01)  # 110: ten newer buckets have begun, the bucket of 100 leaves
    assert window.total() == 1
    clock.advance(5)
    assert window.total() == 0


def test_window_reuses_a_slot_without_carrying_its_old_count() -> None:
    clock = FakeClock(0.0)
    window = SlidingWindow(span=1, buckets=4, clock=clock)  # 250 ms buckets
    window.add(7)
    clock.advance(1.0)  # same slot, four buckets later
    window.add()
    assert window.total() == 1
    clock.advance(100)  # long idle: everything is out
    assert window.total() == 0
    window.add(3)
    window.clear()
    assert window.total() == 0


def test_budget_allows_ratio_of_requests_plus_the_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, clock=clock)
    assert not budget.has_room()  # no traffic, no floor: no retries
    for _ in range(10):
        budget.deposit()
    assert budget.has_room()
    budget.spend()
    budget.spend()
    assert not budget.has_room()  # 2 retries = 0.2 * 10 requests
    for _ in range(5):
        budget.deposit()
    assert budget.has_room()  # 3 <= 0.2 * 15


def test_budget_floor_and_expiry_over_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.5, clock=clock, window=10)  # floor: 5 per 10 s
    for _ in range(5):
        assert budget.has_room()
        budget.spend()
    assert not budget.has_room()
    clock.advance(9)
    assert not budget.has_room()
    clock.advance(1)  # the retries of that second have left the 10 s window
    assert budget.has_room()


def test_budget_question_spends_nothing() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, clock=FakeClock(), window=10)  # exactly one
    assert budget.has_room() and budget.has_room()
    budget.spend()
    assert not budget.has_room()


def test_failure_rate_waits_for_min_requests_then_trips_at_the_threshold() -> None:
    clock = FakeClock()
    rate = FailureRateWindow(FailureRate(threshold=0.5, window=10.0, min_requests=4), clock)
    assert rate.record(True) is False
    assert rate.record(True) is False
    assert rate.record(False) is False  # 2 of 3: above the threshold, below min_requests
    assert rate.record(False) is True  # 2 of 4 reaches 0.5


def test_failure_rate_forgets_failures_that_left_the_window() -> None:
    clock = FakeClock()
    rate = FailureRateWindow(FailureRate(threshold=0.5, window=10.0, min_requests=4), clock)
    for _ in range(3):
        rate.record(True)
    clock.advance(10)  # those three leave
    assert [rate.record(False) for _ in range(3)] == [False, False, False]
    assert rate.record(True) is False  # 1 of 4
    rate.clear()
    assert [rate.record(True) for _ in range(4)] == [False, False, False, True]
