"""The delivery side of a running sidecar: one store, a deliverer per queued route, queue gauges.

The runtime opens it at start when any route has `delivery:` (or at the first reload that adds
one), asks it for a `RouteQueue` per queued route as it builds routes, calls `run()` with the
queues now in force (start, reload) and `stop()` on shutdown. The store outlives reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.config.delivery import RouteDelivery
from sidecar.delivery.deliverer import Deliverer, new_owner
from sidecar.delivery.model import Decision, Message, Schedule, Status, Verdict
from sidecar.delivery.queue import RouteQueue
from sidecar.delivery.store import Store, StoreUnavailable, open_store
from sidecar.proxy.call import Handler
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import DeliveryMetrics

log = logging.getLogger("sidecar.delivery")

# How often the queue gauges are read from the store (every worker reads the same store).
STATS_SECONDS = 1.0
OUTCOMES = {Verdict.DELIVERED: "delivered", Verdict.RETRY: "retried", Verdict.DEAD: "dead"}


class DeliveryService:
    def __init__(self, store: Store, metrics: DeliveryMetrics, events: EventBus) -> None:
        self.store = store
        self.metrics = metrics
        self.events = events
        self.owner = new_owner()
        self._running: dict[str, tuple[RouteQueue, Deliverer]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._stats: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, spec: str, state_dir: Path, metrics: DeliveryMetrics, events: EventBus) -> DeliveryService:
        """Raises StoreError naming the directory or file when the store cannot be opened."""
        return cls(await open_store(spec, state_dir), metrics, events)

    def queue(
        self, route: str, policy: RouteDelivery, handler: Handler, breaker_open: Callable[[], bool], idle: float,
    ) -> RouteQueue:
        return RouteQueue(route, policy, self.store, handler, breaker_open, self.metrics, self.events, idle)

    @property
    def queues(self) -> dict[str, RouteQueue]:
        return {name: queue for name, (queue, _) in self._running.items()}

    def run(self, queues: dict[str, RouteQueue], leases: dict[str, float], grace: float) -> None:
        """Deliver for exactly `queues`: start new ones, stop those gone or replaced (in the background,
        their attempts in flight get `grace`)."""
        for name, (queue, deliverer) in list(self._running.items()):
            if queues.get(name) is not queue:
                del self._running[name]
                queue.wake = lambda: None
                self._stop_in_background(deliverer, grace)
                if name not in queues:
                    self.metrics.forget(name, [status.value for status in Status])
        for name, queue in queues.items():
            if name in self._running:
                continue
            deliverer = Deliverer(
                name, self.store, Schedule(queue.policy), queue.send, owner=self.owner, lease=leases[name],
                breaker_open=queue.breaker_open, on_decision=self._decided,
            )
            deliverer.start()
            queue.wake = deliverer.wake
            self._running[name] = (queue, deliverer)
        if self._stats is None:
            self._stats = asyncio.create_task(self._refresh_stats(), name="delivery stats")

    def _stop_in_background(self, deliverer: Deliverer, grace: float) -> None:
        task = asyncio.create_task(deliverer.stop(grace), name=f"stop delivering {deliverer.route}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _decided(self, message: Message, decision: Decision) -> None:
        self.metrics.outcome(message.route, OUTCOMES[decision.verdict])
        if decision.verdict is Verdict.DEAD:
            self.events.publish(
                "delivery_dead", message.route, id=message.id, reason=decision.dead_reason, attempts=decision.attempts,
            )

    async def _refresh_stats(self) -> None:
        while True:
            await self.refresh_stats()
            await asyncio.sleep(STATS_SECONDS)

    async def refresh_stats(self) -> None:
        try:
            stats = await self.store.stats(now=time.time())
        except StoreUnavailable as exc:
            log.warning("queue gauges not refreshed: %s", exc)
            return
        for name in self._running:
            route = stats.get(name)
            if route is None:
                self.metrics.queue(name, {status.value: 0 for status in Status}, 0, 0.0)
            else:
                counts = {status.value: route.counts.get(status, 0) for status in Status}
                self.metrics.queue(name, counts, route.bytes, route.oldest_queued_age)

    async def stop(self, grace: float) -> None:
        """Shutdown: attempts in flight get `grace`, the rest stays stored (then `close()`)."""
        if self._stats is not None:
            self._stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats
            self._stats = None
        running, self._running = self._running, {}
        await asyncio.gather(*(deliverer.stop(grace) for _, deliverer in running.values()), *self._stopping)

    async def close(self) -> None:
        await self.store.close()
