"""A route's retry budget: retries may add `ratio` of recent requests, plus a floor for low traffic.

As in Linkerd and Finagle: over a sliding window (10s), retries are allowed while
    retries < ratio * requests + min_per_second * window
so a fleet of sidecars cannot multiply load on a sick upstream by more than 1 + ratio
once traffic is above the floor.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.policy.window import SlidingWindow

WINDOW_SECONDS = 10


class RetryBudget:
    def __init__(self, ratio: float, min_per_second: float, clock: Callable[[], float],
                 window: int = WINDOW_SECONDS) -> None:
        self._ratio = ratio
        self._reserve = min_per_second * window
        # One bucket per second of the window.
        self._requests = SlidingWindow(window, window, clock)
        self._retries = SlidingWindow(window, window, clock)

    def deposit(self) -> None:
        """A request arrived: it earns `ratio` of a retry."""
        self._requests.add()

    def has_room(self) -> bool:
        """Whether one more retry fits; asking spends nothing."""
        return self._retries.total() + 1 <= self._ratio * self._requests.total() + self._reserve

    def spend(self) -> None:
        """A retry is going ahead."""
        self._retries.add()
