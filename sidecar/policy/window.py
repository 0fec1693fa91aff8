"""A count over a sliding window of time, in fixed buckets (the retry budget and the
breaker's failure rate both count this way)."""

from __future__ import annotations

from collections.abc import Callable

_NEVER = -(1 << 62)  # the bucket number of a slot never used


class SlidingWindow:
    """Counts what was added in the last `span` seconds, to the precision of one bucket of
    `span / buckets` seconds: a bucket leaves the count once `buckets` newer ones have begun.

    The buckets are a ring, so adding allocates nothing (it runs on every request).
    """

    __slots__ = ("_clock", "_counts", "_numbers", "_size", "_width")

    def __init__(self, span: float, buckets: int, clock: Callable[[], float]) -> None:
        self._width = span / buckets
        self._size = buckets
        self._clock = clock
        self._counts = [0] * buckets
        self._numbers = [_NEVER] * buckets  # which bucket (clock / width) each slot holds now

    def add(self, amount: int = 1) -> None:
        number = int(self._clock() / self._width)
        slot = number % self._size
        if self._numbers[slot] == number:
            self._counts[slot] += amount
        else:  # the slot held a bucket that has left the window: reuse it
            self._numbers[slot] = number
            self._counts[slot] = amount

    def total(self) -> int:
        oldest = int(self._clock() / self._width) - self._size  # this bucket and older are out
        return sum(count for count, number in zip(self._counts, self._numbers, strict=True) if number > oldest)

    def clear(self) -> None:
        self._counts[:] = [0] * self._size
        self._numbers[:] = [_NEVER] * self._size
