"""Per-request histogram observations tallied in plain Python and folded into prometheus-client.

The wire is the one package allowed to touch library internals: this module writes a
histogram child's private buckets and sum, which prometheus-client offers no public call for.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Histogram


class HistogramTally:
    """Observations counted in plain Python, added to a prometheus-client histogram child on flush.

    prometheus-client stores a histogram as one value per bucket (not cumulative) plus a
    sum, and has no public call to add many observations at once; `_upper_bounds`,
    `_buckets` and `_sum` are its own attributes (checked against Histogram.observe by
    tests/test_metric_tallies.py; the version is pinned in pyproject.toml).
    """

    __slots__ = ("_bounds", "_child", "counts", "sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self.counts = [0] * len(self._bounds)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= seconds, as Histogram.observe picks it.
        self.counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds

    def flush(self) -> None:
        buckets = self._child._buckets
        for index, count in enumerate(self.counts):
            if count:
                buckets[index].inc(count)
                self.counts[index] = 0
        if self.sum:
            self._child._sum.inc(self.sum)
            self.sum = 0.0
