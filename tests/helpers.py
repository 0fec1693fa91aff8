"""Helpers shared by tests that are not fixtures: one-line HTTP calls, fake clocks, a
virtual-time event loop. (Fixtures, the scriptable upstream and `wait_until` are in conftest.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy


async def get(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, CIMultiDictProxy[str]]:
    """GET `url`: status, body text, headers."""
    async with client.get(url, **kwargs) as response:
        return response.status, await response.text(), response.headers


async def status_of(
    client: aiohttp.ClientSession, url: str, method: str = "GET", **kwargs: Any
) -> tuple[int, str | None]:
    """The status and the x-sidecar-error kind (None for an upstream's own answer); the body is read."""
    async with client.request(method, url, **kwargs) as response:
        await response.read()
        return response.status, response.headers.get("x-sidecar-error")


async def statuses(client: aiohttp.ClientSession, url: str, count: int) -> list[int]:
    """The statuses of `count` GETs of `url`, one after another."""
    result = []
    for _ in range(count):
        async with client.get(url) as response:
            await response.read()
            result.append(response.status)
    return result


class FakeClock:
    """A clock a test moves by hand: pass it where a policy takes `clock: Callable[[], float]`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when a test says so (`advance`), for loop timers
    (call_at, asyncio.timeout) without real waiting. Timers due at the new time run on the
    next loop iteration; `settle()` gives them and what they wake a few iterations."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.timers_set = 0  # call_at/call_later calls: how many loop timers code asked for

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        self.timers_set += 1
        return super().call_at(when, callback, *args, context=context)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        await settle()


async def settle(iterations: int = 10) -> None:
    """Let ready callbacks and woken tasks run (a bounded number of loop iterations)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


def run_virtual(test: Callable[[VirtualClockLoop], Coroutine[Any, Any, None]]) -> None:
    """Run `test(loop)` to completion on a fresh VirtualClockLoop; it must not wait on a timer
    it has not advanced to (the loop would spin until pytest-timeout)."""
    loop = VirtualClockLoop()
    try:
        loop.run_until_complete(test(loop))
    finally:
        left = asyncio.all_tasks(loop)  # a failed test leaves tasks behind: end them quietly
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()
