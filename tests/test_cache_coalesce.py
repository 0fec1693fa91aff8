"""Request coalescing (sidecar/cache/coalesce.py): plain asyncio, synchronised by events, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable

import pytest

from sidecar.cache.coalesce import MAX_ROUNDS, Coalescer, Joined, Role


class Upstream:
    """A fetch that counts its calls and answers only when released."""

    def __init__(self, value: str = "stored") -> None:
        self.calls = 0
        self.value = value
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.error: BaseException | None = None

    async def fetch(self) -> str:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


def storable(value: str) -> bool:
    return value == "stored"


async def until(condition: Callable[[], bool], rounds: int = 1000) -> None:
    """Let the loop run until `condition` holds (bounded in rounds, no wall-clock waits)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def far() -> float:
    return asyncio.get_running_loop().time() + 60


async def test_hundred_concurrent_callers_make_one_fetch() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream()
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    followers = [asyncio.create_task(coalescer.run("/a", upstream.fetch, far())) for _ in range(99)]
    await until(lambda: all(not f.done() for f in followers) and coalescer.in_flight == 1)
    await asyncio.sleep(0)  # every follower is waiting now
    upstream.release.set()
    results = [await leader, *await asyncio.gather(*followers)]
    assert upstream.calls == 1
    assert results[0] == Joined(Role.LED, "stored")
    assert all(r == Joined(Role.SHARED, "stored") for r in results[1:])
    assert coalescer.in_flight == 0


async def test_different_keys_do_not_wait_for_each_other() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    first, second = Upstream(), Upstream()
    a = asyncio.create_task(coalescer.run("/a", first.fetch, far()))
    b = asyncio.create_task(coalescer.run("/b", second.fetch, far()))
    await first.started.wait()
    await second.started.wait()
    assert coalescer.in_flight == 2
    first.release.set()
    second.release.set()
    assert [(await a).role, (await b).role] == [Role.LED, Role.LED]


async def test_not_storable_each_waiter_goes_itself() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream(value="streamed")
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    followers = [asyncio.create_task(coalescer.run("/a", upstream.fetch, far())) for _ in range(10)]
    await until(lambda: coalescer.in_flight == 1)
    await asyncio.sleep(0)
    upstream.release.set()
    assert await leader == Joined(Role.LED, "streamed")
    assert [r.role for r in await asyncio.gather(*followers)] == [Role.ALONE] * 10
    assert upstream.calls == 1  # the coalescer fetched once; going alone is the caller's own request


async def test_a_waiters_deadline_bounds_its_wait() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream()
    loop = asyncio.get_running_loop()
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    # A deadline already passed: no wait at all.
    assert await coalescer.run("/a", upstream.fetch, loop.time() - 1) == Joined(Role.TIMED_OUT)
    # A near deadline: the follower gives up while the fetch still runs, and the fetch goes on.
    assert await coalescer.run("/a", upstream.fetch, loop.time() + 0.01) == Joined(Role.TIMED_OUT)
    assert not leader.done() and coalescer.in_flight == 1
    patient = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await asyncio.sleep(0)
    upstream.release.set()
    assert (await leader).role is Role.LED
    assert (await patient).role is Role.SHARED
    assert upstream.calls == 1


async def test_the_fetch_failing() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream()
    upstream.error = ConnectionResetError("upstream gone")
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    followers = [asyncio.create_task(coalescer.run("/a", upstream.fetch, far())) for _ in range(5)]
    await until(lambda: coalescer.in_flight == 1)
    await asyncio.sleep(0)
    upstream.release.set()
    with pytest.raises(ConnectionResetError):  # the leader gets its own error
        await leader
    assert [r.role for r in await asyncio.gather(*followers)] == [Role.ALONE] * 5  # the others try themselves
    assert coalescer.in_flight == 0
    # Nothing is left behind: the next caller leads a fresh fetch.
    upstream.error = None
    assert (await coalescer.run("/a", upstream.fetch, far())).role is Role.LED


async def test_a_failed_fetch_with_nobody_waiting_leaves_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    coalescer: Coalescer[str] = Coalescer(storable)

    async def fails() -> str:
        raise ValueError("boom")  # a new exception, referenced by nothing once handled

    async def fail_once() -> None:
        with contextlib.suppress(ValueError):
            await coalescer.run("/a", fails, far())

    await fail_once()
    gc.collect()  # the flight is garbage now; asyncio reports unretrieved exceptions as it goes
    loop.set_exception_handler(None)
    assert reported == []


async def test_a_cancelled_leader_hands_over_to_a_follower() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream()
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    followers = [asyncio.create_task(coalescer.run("/a", upstream.fetch, far())) for _ in range(5)]
    await until(lambda: coalescer.in_flight == 1)
    await asyncio.sleep(0)
    upstream.started.clear()
    leader.cancel()  # its caller hung up
    async with asyncio.timeout(10):  # a bound in case no follower takes over (the failure)
        await upstream.started.wait()  # one follower took the lead and fetches again
    assert upstream.calls == 2
    upstream.release.set()
    results = await asyncio.gather(*followers)
    assert sorted(r.role.value for r in results) == ["led", "shared", "shared", "shared", "shared"]
    assert leader.cancelled()


async def test_rounds_are_bounded_when_leaders_keep_leaving() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    leaders: list[asyncio.Task[Joined[str]]] = []
    started = asyncio.Event()

    async def hangs() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    def lead() -> None:
        started.clear()
        leaders.append(asyncio.create_task(coalescer.run("/a", hangs, far())))

    async def never_called() -> str:
        raise AssertionError("the follower should go alone, not lead")

    lead()
    await started.wait()
    follower = asyncio.create_task(coalescer.run("/a", never_called, far()))
    for _ in range(MAX_ROUNDS):
        await until(lambda: coalescer.in_flight == 1)
        await asyncio.sleep(0)
        leaders[-1].cancel()
        await asyncio.sleep(0)
        # Another caller leads before the follower can (it always finds a flight).
        lead()
        await started.wait()
    assert (await follower) == Joined(Role.ALONE)
    leaders[-1].cancel()
    await asyncio.gather(*leaders, return_exceptions=True)


async def test_a_cancelled_follower_does_not_disturb_the_fetch() -> None:
    coalescer: Coalescer[str] = Coalescer(storable)
    upstream = Upstream()
    leader = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await upstream.started.wait()
    follower = asyncio.create_task(coalescer.run("/a", upstream.fetch, far()))
    await asyncio.sleep(0)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    upstream.release.set()
    assert await leader == Joined(Role.LED, "stored")


def test_wait_helper_is_bounded() -> None:
    async def never() -> None:
        await until(lambda: False, rounds=3)

    with pytest.raises(AssertionError):
        asyncio.run(never())

