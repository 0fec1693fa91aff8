"""Per-try timeouts on a virtual-time loop: shared timer, own timer out of order, stop, and
whose cancellation it is."""

from __future__ import annotations

import asyncio

from sidecar.policy.per_try_timeouts import PerTryTimeouts
from tests.helpers import VirtualClockLoop, run_virtual, settle


async def attempt(timeouts: PerTryTimeouts, budget: float, answer: asyncio.Future[str]) -> str:
    """An attempt as forward.py runs one: waits for `answer` under its per-try expiry."""
    loop = asyncio.get_running_loop()
    expiry = timeouts.start(loop.time() + budget)
    try:
        return await answer
    except asyncio.CancelledError:
        if expiry.owns_cancellation():
            return "timed out"
        raise
    finally:
        timeouts.stop(expiry)


def start(
    loop: VirtualClockLoop, timeouts: PerTryTimeouts, budget: float
) -> tuple[asyncio.Task[str], asyncio.Future[str]]:
    answer: asyncio.Future[str] = loop.create_future()
    return loop.create_task(attempt(timeouts, budget, answer)), answer


def test_attempts_in_start_order_share_one_timer_and_each_expires_on_time() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        timeouts = PerTryTimeouts(loop)
        first, _ = start(loop, timeouts, 1.0)
        await settle()
        await loop.advance(0.5)
        second, _ = start(loop, timeouts, 1.0)
        await settle()
        assert loop.timers_set == 1  # the second waits behind the first's timer
        await loop.advance(0.49)
        assert not first.done() and not second.done()
        await loop.advance(0.01)  # 1.0: the first's expiry
        assert first.result() == "timed out" and not second.done()
        await loop.advance(0.5)  # 1.5: the second's
        assert second.result() == "timed out"
        assert loop.timers_set == 2  # the shared timer re-armed once for the second

    run_virtual(scenario)


def test_an_earlier_expiry_out_of_order_gets_its_own_timer() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        timeouts = PerTryTimeouts(loop)
        long, _ = start(loop, timeouts, 5.0)
        await settle()
        short, _ = start(loop, timeouts, 0.2)  # a caller's short x-sidecar-timeout-ms
        await settle()
        assert loop.timers_set == 2
        await loop.advance(0.2)
        assert short.result() == "timed out"  # not held back until the long one's expiry
        assert not long.done()
        await loop.advance(4.8)
        assert long.result() == "timed out"

    run_virtual(scenario)


def test_an_attempt_that_answers_in_time_is_never_cancelled() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        timeouts = PerTryTimeouts(loop)
        first, first_answer = start(loop, timeouts, 1.0)
        second, _ = start(loop, timeouts, 1.0)
        await settle()
        first_answer.set_result("answered")
        await settle()
        assert first.result() == "answered"
        await loop.advance(1.0)  # the shared timer wakes: only the second is still pending
        assert second.result() == "timed out"
        await loop.advance(10)
        assert first.result() == "answered"

    run_virtual(scenario)


def test_a_cancellation_by_someone_else_is_not_a_timeout() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        timeouts = PerTryTimeouts(loop)
        gone, _ = start(loop, timeouts, 1.0)
        both, _ = start(loop, timeouts, 1.0)
        await settle()
        gone.cancel()  # the caller hung up before the expiry
        await settle()
        assert gone.cancelled()
        # The expiry fires, and in the same loop iteration, before the task runs, shutdown
        # cancels it too: the outer cancellation must win, not become "timed out".
        loop.call_at(loop.now + 1.0 + 1e-6, both.cancel)
        await loop.advance(1.0 + 1e-6)
        assert both.cancelled()

    run_virtual(scenario)


def test_after_all_expire_a_new_attempt_starts_a_new_order() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        timeouts = PerTryTimeouts(loop)
        first, _ = start(loop, timeouts, 2.0)
        await settle()
        await loop.advance(2.0)
        assert first.result() == "timed out"
        later, _ = start(loop, timeouts, 0.5)  # earlier than the old latest would allow: none pending now
        await settle()
        await loop.advance(0.5)
        assert later.result() == "timed out"

    run_virtual(scenario)
