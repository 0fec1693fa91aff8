"""The storage interface both backends implement (SQLite on local disk, Redis shared by pods).

The contract, which tests/test_delivery_store.py checks for both:

- `accept` returns only once the message is durable. The same (route, idempotency key) within
  the dedupe window returns the first id (`duplicate=True`) and stores nothing. A route over its
  `max_pending` or `max_bytes` raises QueueFull and stores nothing; storage that cannot be
  written raises StoreUnavailable.
- `claim_due` hands due messages to one owner under a lease; a message whose lease expired
  (its worker died) can be claimed by another owner; every claimer of a route passes the same
  lease. `ordered=True` (concurrency 1) hands out the first `limit` unfinished messages of the
  route in line order, stopping at the first one that is not free and due: a message waiting for
  a retry, or held by another owner, holds back the ones behind it.
- The `mark_*`, `reschedule` and `release` calls apply only for the lease's current owner and
  return False otherwise (the lease expired and another owner took the message).
- `retry` and `redrive` put dead messages back in the queue with a fresh set of attempts and a
  fresh ttl, at the back of the line; `retry` also makes a waiting message due now.
- Delivered records lose their body; `purge` deletes them after the route's retention.
- Statuses are queued, delivering, delivered and dead (model.Status). Queued, delivering and
  dead messages count against the route's limits; delivered ones do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sidecar.config.delivery import RouteDelivery
from sidecar.delivery.model import Message, Status


class StoreError(Exception):
    """A store that cannot be opened: the message names the file or server and what is wrong."""


class StoreUnavailable(StoreError):
    """The store cannot take a write now (disk full, read-only, server gone): answer 503, never 202."""


class QueueFull(Exception):
    def __init__(self, route: str, limit: str) -> None:
        super().__init__(f"route {route!r} is at its delivery {limit}")
        self.route = route
        self.limit = limit  # max_pending or max_bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """What `accept` enforces for a route."""

    max_pending: int
    max_bytes: int
    dedupe_window: float

    @classmethod
    def of(cls, policy: RouteDelivery) -> Limits:
        return cls(policy.max_pending, policy.max_bytes, policy.dedupe_window)


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    duplicate: bool  # the key was seen within the dedupe window: this is the first message's id


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Message]  # ordered by id; bodies are not loaded (empty), `size` says how large
    after: str | None  # pass as `after` for the next page; None on the last page


@dataclass(frozen=True, slots=True)
class RouteStats:
    counts: dict[Status, int] = field(default_factory=lambda: dict.fromkeys(Status, 0))
    bytes: int = 0  # bodies of queued, delivering and dead messages
    oldest_queued_age: float = 0.0  # seconds since the oldest queued or delivering message was queued


class Store(Protocol):
    """Durable messages of every queued route. Every method may raise StoreUnavailable."""

    async def close(self) -> None: ...

    async def accept(self, message: Message, limits: Limits, *, dedupe: bool = True) -> Accepted:
        """Store a new message durably; `dedupe=False` when the key was generated (nothing to match)."""

    async def claim_due(
        self, route: str, *, owner: str, now: float, lease: float, limit: int, ordered: bool
    ) -> list[Message]:
        """Due messages of `route`, now DELIVERING and leased to `owner` until now + lease."""

    async def mark_delivered(self, message_id: str, *, owner: str, now: float, attempts: int, status: int) -> bool:
        ...

    async def reschedule(
        self, message_id: str, *, owner: str, now: float, attempts: int, next_attempt_at: float,
        error: str | None, status: int | None,
    ) -> bool:
        ...

    async def mark_dead(
        self, message_id: str, *, owner: str, now: float, attempts: int, reason: str,
        error: str | None, status: int | None,
    ) -> bool:
        ...

    async def release(self, message_id: str, *, owner: str, now: float) -> bool:
        """Give a claimed message back untouched (shutdown before its attempt started)."""

    async def get(self, message_id: str) -> Message | None: ...

    async def list(
        self, route: str | None = None, status: Status | None = None, limit: int = 100, after: str | None = None
    ) -> Page:
        ...

    async def retry(self, message_id: str, *, now: float) -> bool:
        """A dead or queued message: due now (dead ones with fresh attempts and ttl). False otherwise."""

    async def redrive(self, route: str, *, now: float) -> int:
        """Every dead message of the route back to the queue; how many."""

    async def delete(self, message_id: str) -> bool: ...

    async def stats(self, *, now: float) -> dict[str, RouteStats]: ...

    async def purge(self, route: str, *, before: float) -> int:
        """Delete the route's delivered records last updated before `before`; how many."""


async def open_store(spec: str, state_dir: Path) -> Store:
    """The store named by the top-level `delivery.store`: "sqlite" or a redis:// URL."""
    if spec == "sqlite":
        from sidecar.delivery.sqlite_store import SqliteStore

        return await SqliteStore.open(state_dir / "delivery.sqlite3")
    from sidecar.delivery.redis_store import RedisStore

    return await RedisStore.open(spec)
