"""Concurrency limit per route (bulkhead): a slow route cannot take what other routes need.

A request holds a slot from admission until its response is complete (streams
included). Over `max_concurrent` it waits in a queue of at most `max_pending` for up to
`queue_timeout`; otherwise it gets 503 `overloaded` at once. Never retried.
"""

from __future__ import annotations

import asyncio

from sidecar.call import Call, Handler, Layer
from sidecar.config.schema import Limits
from sidecar.errors import Overloaded
from sidecar.events import EventBus
from sidecar.metrics import RouteMetrics
from sidecar.upstream_client import UpstreamResponse


class Bulkhead:
    def __init__(self, route: str, limits: Limits, metrics: RouteMetrics, events: EventBus) -> None:
        self._route = route
        self._events = events
        self._limits = limits
        self._slots = asyncio.Semaphore(limits.max_concurrent)
        self._pending = 0
        self._metrics = metrics

    async def acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: returns at once
            return
        limits = self._limits
        if self._pending >= limits.max_pending:
            limit = "concurrent" if limits.max_pending == 0 else "pending"
            self._refuse(limit, f"{limits.max_concurrent} requests in flight" + (
                f" and {limits.max_pending} waiting" if limits.max_pending else ""))
        self._pending += 1
        try:
            async with asyncio.timeout(limits.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            self._refuse("queue_timeout", f"no slot within {limits.queue_timeout:g}s")
        finally:
            self._pending -= 1

    def _refuse(self, limit: str, why: str) -> None:
        self._metrics.limit_rejected(limit)
        self._events.publish_limited("limit_rejected", self._route, limit=limit)
        raise Overloaded(f"the route is at its concurrency limit: {why}", limit)

    def release(self) -> None:
        self._slots.release()


def limit_layer(bulkhead: Bulkhead) -> Layer:
    def wrap(inner: Handler) -> Handler:
        async def limited(call: Call) -> UpstreamResponse:
            await bulkhead.acquire()
            try:
                response = await inner(call)
            except BaseException:
                bulkhead.release()
                raise
            call.on_complete.append(bulkhead.release)  # held until the body has been relayed
            return response

        return limited

    return wrap
