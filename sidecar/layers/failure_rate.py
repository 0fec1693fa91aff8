"""The second trip rule: the share of failed attempts over a sliding window.

pybreaker only counts consecutive failures. This keeps counts in ten buckets over
`window` and says when the share of failures reaches `threshold` with at least
`min_requests` attempts in the window; the breaker layer then opens its pybreaker
breaker through pybreaker's own API, so there is still one breaker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from sidecar.config.schema import FailureRate

BUCKETS = 10


class FailureRateWindow:
    def __init__(self, rule: FailureRate, clock: Callable[[], float]) -> None:
        self._rule = rule
        self._width = rule.window / BUCKETS
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [bucket number, attempts, failures], oldest first

    def record(self, failed: bool) -> bool:
        """Count one attempt; True when the rule says the breaker should open."""
        number = int(self._clock() / self._width)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append([number, 0, 0])
            while buckets[0][0] <= number - BUCKETS:
                buckets.popleft()
        buckets[-1][1] += 1
        buckets[-1][2] += failed
        attempts = sum(bucket[1] for bucket in buckets)
        if attempts < self._rule.min_requests:
            return False
        return sum(bucket[2] for bucket in buckets) / attempts >= self._rule.threshold

    def clear(self) -> None:
        self._buckets.clear()
