"""Concurrency limit per route (bulkhead): a slow route cannot take what other routes need.

A request holds a slot from admission until the upstream has sent its whole response
(streams included) and at most `server.response_buffer` of it waits for the caller
(relay.py); a small request body is read before admission (proxy.py). Over
`max_concurrent` it waits in a queue of at most `max_pending` for up to `queue_timeout`,
and no longer than the request's total deadline (timeouts.total or the caller's
x-sidecar-timeout-ms); otherwise it gets 503 `overloaded` at once. Never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable
from typing import NoReturn

from sidecar.config.schema import Limits
from sidecar.errors import Overloaded
from sidecar.proxy.call import Call, Handler, Layer, Response
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import RouteMetrics


class Bulkhead:
    """Slots counted by hand rather than with asyncio.Semaphore: a free slot is taken
    without a coroutine call, and a released slot goes straight to the longest waiter."""

    def __init__(self, route: str, limits: Limits, metrics: RouteMetrics, events: EventBus) -> None:
        self._route = route
        self._events = events
        self._limits = limits
        self._free = limits.max_concurrent
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._metrics = metrics

    def try_acquire(self) -> bool:
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def wait(self, deadline: float = math.inf) -> None:
        """Queue for a slot (after try_acquire failed), within max_pending, queue_timeout and
        the request's own deadline (loop time): a caller's wait never outlasts what it asked for."""
        limits = self._limits
        if len(self._waiters) >= limits.max_pending:
            limit = "concurrent" if limits.max_pending == 0 else "pending"
            self._refuse(limit, f"{limits.max_concurrent} requests in flight" + (
                f" and {limits.max_pending} waiting" if limits.max_pending else ""))
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = loop.create_future()
        self._waiters.append(slot)
        try:
            async with asyncio.timeout_at(min(now + limits.queue_timeout, deadline)):
                await slot
        except BaseException as exc:
            if slot.done() and not slot.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                slot.cancel()  # release() skips it
                with contextlib.suppress(ValueError):
                    self._waiters.remove(slot)
            if isinstance(exc, TimeoutError):
                if deadline < now + limits.queue_timeout:
                    self._refuse("queue_timeout", f"no slot within the request's deadline of {deadline - now:.3g}s")
                self._refuse("queue_timeout", f"no slot within {limits.queue_timeout:g}s")
            raise

    def _refuse(self, limit: str, why: str) -> NoReturn:
        self._metrics.limit_rejected(limit)
        self._events.publish_limited("limit_rejected", self._route, limit=limit)
        raise Overloaded(f"the route is at its concurrency limit: {why}", limit)

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot changes hands without ever being free
                return
        self._free += 1


def limit_layer(bulkhead: Bulkhead) -> Layer:
    def wrap(inner: Handler) -> Handler:
        # The slot is held until the upstream side is done: `call.complete()` runs
        # `on_complete` then, or when the request failed, whatever happened, so no layer
        # of its own needs to catch anything here.
        def limited(call: Call) -> Awaitable[Response]:
            if not bulkhead.try_acquire():
                return queued(call)
            call.on_complete.append(bulkhead.release)
            return inner(call)  # a free slot costs no coroutine of our own

        async def queued(call: Call) -> Response:
            await bulkhead.wait(call.deadline)  # stamped by the deadline layer outside this one
            call.on_complete.append(bulkhead.release)
            return await inner(call)

        return limited

    return wrap
