"""A route's retry budget: retries may add `ratio` of recent requests, plus a floor for low traffic.

As in Linkerd and Finagle: over a sliding window (10s), retries are allowed while
    retries < ratio * requests + min_per_second * window
so a fleet of sidecars cannot multiply load on a sick upstream by more than 1 + ratio
once traffic is above the floor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 10


class RetryBudget:
    def __init__(self, ratio: float, min_per_second: float, clock: Callable[[], float],
                 window: int = WINDOW_SECONDS) -> None:
        self._ratio = ratio
        self._reserve = min_per_second * window
        self._window = window
        self._clock = clock
        # One [second, requests, retries] bucket per second of the window, oldest first.
        self._buckets: deque[list[int]] = deque()

    def _current(self) -> list[int]:
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
            while buckets[0][0] <= second - self._window:
                buckets.popleft()
        return buckets[-1]

    def deposit(self) -> None:
        """A request arrived: it earns `ratio` of a retry."""
        self._current()[1] += 1

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it."""
        current = self._current()
        requests = sum(bucket[1] for bucket in self._buckets)
        retries = sum(bucket[2] for bucket in self._buckets)
        if retries + 1 > self._ratio * requests + self._reserve:
            return False
        current[2] += 1
        return True
