"""Operational events (breaker transitions, ejections, rejections, config loads) for /api/v1/events.

Publishing never waits: each subscriber has a bounded queue, and a subscriber too
slow to keep up loses events, counted, and is told so with a `lagged` event. Noisy
kinds (limit rejections, budget exhaustion) are published at most once per second
per route, with the number suppressed in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.timestamps import iso_now

Event = dict[str, Any]
QUEUE_SIZE = 256
RATE_LIMIT_SECONDS = 1.0


class Subscriber:
    def __init__(self, metrics: Metrics, size: int) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self._metrics = metrics
        self.dropped = 0

    def offer(self, event: Event | None) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self._metrics.events_dropped.inc()

    async def next(self, wait: float) -> Event | None:
        """The next event, a `lagged` notice if some were dropped, or None on timeout or close."""
        if self.dropped and self._queue.empty():
            lagged = {"time": iso_now(), "kind": "lagged", "route": None, "dropped": self.dropped}
            self.dropped = 0
            return lagged
        try:
            async with asyncio.timeout(wait):
                return await self._queue.get()
        except TimeoutError:
            return None

    def wake(self) -> None:
        """Unblock a waiting `next()` (it returns None); a full queue is awake already."""
        if not self._queue.full():
            self._queue.put_nowait(None)


class EventBus:
    def __init__(self, metrics: Metrics, queue_size: int = QUEUE_SIZE) -> None:
        self._metrics = metrics
        self._queue_size = queue_size
        self._subscribers: set[Subscriber] = set()
        self._last: dict[tuple[str, str | None], float] = {}
        self._suppressed: dict[tuple[str, str | None], int] = {}
        self.closed = False

    def publish(self, kind: str, route: str | None = None, **fields: Any) -> None:
        if not self._subscribers:
            return
        event = {"time": iso_now(), "kind": kind, "route": route, **fields}
        for subscriber in self._subscribers:
            subscriber.offer(event)

    def publish_limited(self, kind: str, route: str | None = None, **fields: Any) -> None:
        """Publish at most once per second per kind and route; the next event says how many were held back."""
        key = (kind, route)
        now = time.monotonic()
        if now - self._last.get(key, -RATE_LIMIT_SECONDS) < RATE_LIMIT_SECONDS:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        self.publish(kind, route, suppressed=self._suppressed.pop(key, 0), **fields)

    @contextmanager
    def subscribe(self) -> Iterator[Subscriber]:
        subscriber = Subscriber(self._metrics, self._queue_size)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every stream (on shutdown): readers see `closed` once woken."""
        self.closed = True
        for subscriber in self._subscribers:
            subscriber.wake()
