"""Wall-clock timestamps as the sidecar writes them everywhere (logs, access log, events, admin):
UTC with milliseconds, `2026-11-25T23:16:56.123Z`.

Only for showing a moment to people and tools; durations and deadlines use the loop's
monotonic clock, never these.
"""

from __future__ import annotations

import time


def _seconds(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso(timestamp: float) -> str:
    """A Unix timestamp (seconds) in the sidecar's format; milliseconds truncated, not rounded."""
    second = int(timestamp)  # a moment after 1970: int() is floor
    return f"{_seconds(second)}.{int((timestamp - second) * 1000):03d}Z"


def iso_now() -> str:
    return iso(time.time())


class IsoPerSecond:
    """`iso` for a stream of increasing timestamps (the access log): the part up to the second is
    made once a second, not per line."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, timestamp: float) -> str:
        second = int(timestamp)
        if second != self._second:
            self._second = second
            self._text = _seconds(second)
        return f"{self._text}.{int((timestamp - second) * 1000):03d}Z"
