"""Per-try timeouts: the timer that turns an attempt waiting too long for response headers into
`timeout`, cheaper than one asyncio timer per attempt.

A route's attempts almost always expire in the order they started: the same per-try budget,
from a later start. So the pending ones wait in a dict in start order and share one loop
timer, set for the earliest; an attempt that ends leaves the dict (O(1)), and the shared timer
wakes only when the earliest expiry passes (at most once per per-try budget when nothing
times out). An attempt that would expire before one already waiting (a caller's shorter
x-sidecar-timeout-ms, the last attempt of a nearly spent total deadline) gets a loop timer of
its own, so no attempt ever waits on another's expiry.

Why not `loop.call_at` per attempt: creating, heap-pushing, cancelling and later popping a
TimerHandle cost 1.8 us per request, about 3% of the sidecar's CPU per request.
"""

from __future__ import annotations

import asyncio
import math


class Expiry:
    """One attempt's timer, with asyncio.timeout's rule: its cancellation of the task becomes a
    timeout only if nobody else (the caller leaving, shutdown) cancelled the task too."""

    __slots__ = ("_cancelling", "_fired", "_task", "own_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # With the loop given, Python 3.11 skips get_running_loop() and its getpid(2) syscall.
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self.own_timer: asyncio.TimerHandle | None = None  # set when it could not share the route's

    def fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def owns_cancellation(self) -> bool:
        return self._fired and self._task.uncancel() <= self._cancelling


class PerTryTimeouts:
    """The pending expiries of one route, in start order, under one shared loop timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: dict[Expiry, float] = {}  # insertion order is expiry order
        self._latest = -math.inf  # the latest expiry added while any is pending
        self._timer: asyncio.TimerHandle | None = None

    def start(self, at: float) -> Expiry:
        """An expiry for the current task at loop time `at`; stop() it when the attempt ends."""
        expiry = Expiry(self._loop)
        if at < self._latest:
            expiry.own_timer = self._loop.call_at(at, expiry.fire)  # out of order: its own timer
            return expiry
        self._pending[expiry] = self._latest = at
        if self._timer is None:
            self._timer = self._loop.call_at(at, self._expire)
        return expiry

    def stop(self, expiry: Expiry) -> None:
        # `_latest` stays even when this empties the dict: the shared timer may still be set
        # for an expiry up to `_latest`, and nothing may be added ahead of it.
        if expiry.own_timer is not None:
            expiry.own_timer.cancel()
        else:
            self._pending.pop(expiry, None)

    def _expire(self) -> None:
        """Fire every pending expiry that has passed, then wait for the next one."""
        self._timer = None
        now = self._loop.time()
        pending = self._pending
        while pending:
            expiry, at = next(iter(pending.items()))
            if at > now:
                self._timer = self._loop.call_at(at, self._expire)
                return
            del pending[expiry]
            expiry.fire()
        self._latest = -math.inf  # none pending: the next expiry starts a new order
