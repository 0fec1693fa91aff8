"""Request coalescing: concurrent callers for one key share one in-flight fetch.

The first caller for a key (the leader) runs its fetch in its own task; callers that come
while it runs (followers) wait for its result, each no longer than its own deadline.
The leader always gets its own result (or its own exception). A follower gets:

  SHARED     the leader's result, when `shareable(result)` holds (e.g. a stored entry);
  ALONE      the result is not for sharing (a streamed response, an error): fetch yourself;
  TIMED_OUT  the follower's deadline passed first (the leader's fetch goes on).

If the leader is cancelled (its caller left), its followers start over: one of them
becomes the new leader. That can repeat at most `MAX_ROUNDS` times per follower, then
it fetches alone. Pure asyncio; it knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_ROUNDS = 3


class Role(enum.Enum):
    LED = "led"
    SHARED = "shared"
    ALONE = "alone"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class Joined(Generic[T]):
    role: Role
    value: T | None = None  # the result, for LED and SHARED


class _Abandoned(Exception):
    """The leader's fetch was cancelled: nothing to share, start over."""


class Coalescer(Generic[T]):
    def __init__(self, shareable: Callable[[T], bool]) -> None:
        self._shareable = shareable
        self._flights: dict[Hashable, asyncio.Future[T]] = {}
        self.waiting = 0  # followers waiting right now, over all keys

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def has_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, fetch: Callable[[], Awaitable[T]], deadline: float) -> Joined[T]:
        """Lead a fetch for `key`, or follow the one in flight until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_ROUNDS):
            flight = self._flights.get(key)
            if flight is None:
                return Joined(Role.LED, await self._lead(key, fetch, loop))
            wait = deadline - loop.time()
            if wait <= 0:
                return Joined(Role.TIMED_OUT)
            # asyncio.wait, not wait_for: a follower's timeout or cancellation must not
            # cancel the flight the others share.
            self.waiting += 1
            try:
                done, _ = await asyncio.wait((flight,), timeout=wait)
            finally:
                self.waiting -= 1
            if not done:
                return Joined(Role.TIMED_OUT)
            failure = flight.exception()
            if isinstance(failure, _Abandoned):
                continue
            if failure is not None:
                return Joined(Role.ALONE)
            value = flight.result()
            return Joined(Role.SHARED, value) if self._shareable(value) else Joined(Role.ALONE)
        return Joined(Role.ALONE)

    async def _lead(self, key: Hashable, fetch: Callable[[], Awaitable[T]], loop: asyncio.AbstractEventLoop) -> T:
        flight: asyncio.Future[T] = loop.create_future()
        self._flights[key] = flight
        try:
            value = await fetch()
        except asyncio.CancelledError:
            flight.set_exception(_Abandoned())
            raise
        except BaseException as error:
            flight.set_exception(error)
            raise
        else:
            flight.set_result(value)
            return value
        finally:
            del self._flights[key]
            flight.exception()  # marks it retrieved: no "exception never retrieved" when nobody followed
