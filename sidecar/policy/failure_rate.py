"""The breaker's second trip rule: the share of failed attempts over a sliding window.

pybreaker only counts consecutive failures. This counts attempts and failures over
`window` (in ten buckets) and says when the share of failures reaches `threshold` with at
least `min_requests` attempts in the window; the breaker layer then opens the route's one
breaker.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config.schema import FailureRate
from sidecar.policy.window import SlidingWindow

BUCKETS = 10


class FailureRateWindow:
    def __init__(self, rule: FailureRate, clock: Callable[[], float]) -> None:
        self._rule = rule
        self._attempts = SlidingWindow(rule.window, BUCKETS, clock)
        self._failures = SlidingWindow(rule.window, BUCKETS, clock)

    def record(self, failed: bool) -> bool:
        """Count one attempt; True when the rule says the breaker should open."""
        self._attempts.add()
        if failed:
            self._failures.add()
        attempts = self._attempts.total()
        if attempts < self._rule.min_requests:
            return False
        return self._failures.total() / attempts >= self._rule.threshold

    def clear(self) -> None:
        self._attempts.clear()
        self._failures.clear()
