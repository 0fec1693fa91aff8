"""An upstream's endpoints: round robin, with ejection of endpoints that keep failing.

Outlier ejection (as Envoy's consecutive failures): an endpoint that fails
`consecutive_failures` attempts in a row leaves the rotation for base_ejection x times
it has been ejected (at most 5 minutes). No more than `max_ejection_percent` of the
endpoints are out at once, and at least one always stays in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.config import Endpoint, UpstreamSpec
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import Metrics

MAX_EJECTION_SECONDS = 300.0


class EndpointPool:
    """One per upstream, shared by its routes."""

    def __init__(self, upstream: UpstreamSpec, metrics: Metrics, clock: Callable[[], float], events: EventBus) -> None:
        self.spec = upstream
        self._name = upstream.name
        self._events = events
        self._endpoints = upstream.endpoints
        self._outlier = upstream.outlier
        self._clock = clock
        self._next = 0
        count = len(upstream.endpoints)
        # How many may be out at once: the percentage, and never all of them.
        self._max_ejected = min(count - 1, count * self._outlier.max_ejection_percent // 100)
        self._ejecting = self._outlier.enabled and self._max_ejected > 0
        self._failures = dict.fromkeys(upstream.endpoints, 0)
        self._ejected_until = dict.fromkeys(upstream.endpoints, 0.0)
        self._times_ejected = dict.fromkeys(upstream.endpoints, 0)
        self._ejections = {e: metrics.endpoint_ejections.labels(upstream.name, e.base) for e in upstream.endpoints}
        self._ejected_gauges = {e: metrics.endpoint_ejected.labels(upstream.name, e.base) for e in upstream.endpoints}
        for gauge in self._ejected_gauges.values():
            gauge.set(0)

    def is_ejected(self, endpoint: Endpoint) -> bool:
        return self._ejected_until[endpoint] > self._clock()

    def _maybe_returned(self, endpoint: Endpoint) -> None:
        if not self.is_ejected(endpoint):
            self._ejected_gauges[endpoint].set(0)

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """The next endpoint in turn that is in the rotation, skipping `avoid` (one that just
        failed) when another is available."""
        endpoints = self._endpoints
        count = len(endpoints)
        for skip_avoided in (True, False):
            for _ in range(count):
                endpoint = endpoints[self._next % count]
                self._next += 1
                if (skip_avoided and endpoint == avoid) or (self._ejecting and self.is_ejected(endpoint)):
                    continue
                return endpoint
        return endpoints[self._next % count]  # unreachable while one endpoint always stays in

    def record(self, endpoint: Endpoint, failed: bool) -> None:
        """The outcome of one attempt at `endpoint`: a failure is a transport error or a 5xx."""
        if not self._ejecting:
            return
        if not failed:
            self._failures[endpoint] = 0
            return
        self._failures[endpoint] += 1
        if self._failures[endpoint] < self._outlier.consecutive_failures or self.is_ejected(endpoint):
            return
        now = self._clock()
        if sum(1 for until in self._ejected_until.values() if until > now) >= self._max_ejected:
            return
        self._times_ejected[endpoint] += 1
        seconds = min(MAX_EJECTION_SECONDS, self._outlier.base_ejection * self._times_ejected[endpoint])
        self._ejected_until[endpoint] = now + seconds
        self._failures[endpoint] = 0
        self._ejections[endpoint].inc()
        self._ejected_gauges[endpoint].set(1)
        # Set, not computed at scrape time, so it also works in multiprocess (workers) mode.
        asyncio.get_running_loop().call_later(seconds, self._maybe_returned, endpoint)
        self._events.publish("endpoint_ejected", None, upstream=self._name, endpoint=endpoint.base, seconds=seconds)
