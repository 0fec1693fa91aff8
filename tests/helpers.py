"""Small helpers shared by tests that are not fixtures: fake clocks and HTTP one-liners."""

from __future__ import annotations


class FakeClock:
    """A clock a test moves by hand: pass it where a policy takes `clock: Callable[[], float]`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
