"""The bulkhead on a virtual-time loop: free slots, handover to the longest waiter, max_pending,
queue_timeout, the request's deadline, and waiters that leave."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config.schema import Limits
from sidecar.errors import Overloaded
from sidecar.layers.limit import Bulkhead
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import Metrics
from tests.helpers import VirtualClockLoop, run_virtual, settle


class Route:
    def __init__(self, limits: Limits) -> None:
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        self.bulkhead = Bulkhead("r", limits, metrics.route("r"), EventBus(metrics))

    def rejected(self, limit: str) -> float:
        value = self.registry.get_sample_value("sidecar_limit_rejections_total", {"route": "r", "limit": limit})
        return value or 0.0


async def waiting(route: Route, deadline: float = float("inf")) -> str:
    try:
        await route.bulkhead.wait(deadline)
    except Overloaded as refused:
        return f"{refused.limit}: {refused.message}"
    return "slot"


def test_slots_are_taken_without_waiting_until_none_is_free() -> None:
    route = Route(Limits(max_concurrent=2))
    assert route.bulkhead.try_acquire() and route.bulkhead.try_acquire()
    assert not route.bulkhead.try_acquire()
    route.bulkhead.release()
    assert route.bulkhead.try_acquire()


def test_a_released_slot_goes_to_the_longest_waiter_not_a_newcomer() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        route = Route(Limits(max_concurrent=1, max_pending=2, queue_timeout=5.0))
        assert route.bulkhead.try_acquire()
        first = loop.create_task(waiting(route))
        await settle()
        second = loop.create_task(waiting(route))
        await settle()
        route.bulkhead.release()
        assert not route.bulkhead.try_acquire()  # handed over, never free: a newcomer cannot jump the queue
        await settle()
        assert first.result() == "slot" and not second.done()
        route.bulkhead.release()
        await settle()
        assert second.result() == "slot"
        route.bulkhead.release()
        assert route.bulkhead.try_acquire()  # nobody waits: the slot is free again

    run_virtual(scenario)


@pytest.mark.parametrize(("max_pending", "limit"), [(0, "concurrent"), (1, "pending")])
def test_over_max_pending_is_refused_at_once(max_pending: int, limit: str) -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        route = Route(Limits(max_concurrent=1, max_pending=max_pending, queue_timeout=5.0))
        assert route.bulkhead.try_acquire()
        queued = [loop.create_task(waiting(route)) for _ in range(max_pending)]
        await settle()
        assert (await waiting(route)).startswith(f"{limit}: ")  # no time passed
        assert route.rejected(limit) == 1
        for _ in queued:
            route.bulkhead.release()
        await settle()
        assert [task.result() for task in queued] == ["slot"] * max_pending

    run_virtual(scenario)


def test_a_waiter_is_refused_after_queue_timeout_and_leaves_the_queue() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        route = Route(Limits(max_concurrent=1, max_pending=1, queue_timeout=1.0))
        assert route.bulkhead.try_acquire()
        queued = loop.create_task(waiting(route))
        await settle()
        await loop.advance(0.999)
        assert not queued.done()
        await loop.advance(0.001)
        assert queued.result() == "queue_timeout: the route is at its concurrency limit: no slot within 1s"
        assert route.rejected("queue_timeout") == 1
        route.bulkhead.release()
        assert route.bulkhead.try_acquire()  # the slot did not go to the waiter that left

    run_virtual(scenario)


def test_the_request_deadline_ends_the_wait_before_queue_timeout() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        route = Route(Limits(max_concurrent=1, max_pending=1, queue_timeout=30.0))
        assert route.bulkhead.try_acquire()
        queued = loop.create_task(waiting(route, deadline=loop.time() + 0.1))
        await settle()
        await loop.advance(0.09)
        assert not queued.done()
        await loop.advance(0.01)
        assert queued.result() == (
            "queue_timeout: the route is at its concurrency limit: no slot within the request's deadline of 0.1s"
        )
        assert route.rejected("queue_timeout") == 1

    run_virtual(scenario)


def test_a_cancelled_waiter_gives_up_its_place_and_a_slot_handed_to_it_passes_on() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        route = Route(Limits(max_concurrent=1, max_pending=2, queue_timeout=5.0))
        assert route.bulkhead.try_acquire()
        leaving = loop.create_task(waiting(route))
        await settle()
        leaving.cancel()  # the caller hung up while queued
        await settle()
        assert leaving.cancelled()
        handed = loop.create_task(waiting(route))
        after = loop.create_task(waiting(route))
        await settle()
        route.bulkhead.release()  # handed to `handed`...
        handed.cancel()  # ...which is cancelled before it runs: the slot must pass on
        await settle()
        assert handed.cancelled() and after.result() == "slot"
        route.bulkhead.release()
        assert route.bulkhead.try_acquire()

    run_virtual(scenario)
