"""A stored message, what one delivery attempt came to, and what happens next.

Everything here is pure: the clock and the random source are injected, so the schedule is tested
with a fake clock. Times are wall-clock seconds (time.time()): they are stored, survive restarts
and are compared across processes and pods.
"""

from __future__ import annotations

import enum
import random as _random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.config.delivery import RouteDelivery

Headers = tuple[tuple[str, str], ...]


class Status(enum.StrEnum):
    QUEUED = "queued"  # waiting for its next attempt (next_attempt_at)
    DELIVERING = "delivering"  # claimed by a worker until lease_expires_at
    DELIVERED = "delivered"  # kept for `retention`, without its body
    DEAD = "dead"  # a dead letter: kept until retried, redriven or deleted


# Statuses that occupy the queue: they count against max_pending and max_bytes.
PENDING = frozenset({Status.QUEUED, Status.DELIVERING, Status.DEAD})


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    id: str
    route: str
    method: str
    target: str  # the raw request target (path and query) exactly as the caller sent it
    headers: Headers  # end-to-end request headers, in order, repeated names kept
    body: bytes  # empty once delivered (the record stays for `retention`, its body does not)
    size: int  # the body's length when accepted
    idempotency_key: str  # sent upstream on every attempt
    accepted_at: float
    queued_at: float  # when it (re)entered the queue: accept, retry or redrive; `ttl` counts from here
    updated_at: float
    status: Status = Status.QUEUED
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None  # the kind of the last failed attempt without a response (e.g. timeout)
    last_status: int | None = None  # the upstream status of the last attempt that got one
    dead_reason: str | None = None  # rejected, max_attempts or expired
    lease_owner: str | None = None
    lease_expires_at: float | None = None


_last_id_ms = 0
_last_id_tail = 0


def new_id(now: float | None = None) -> str:
    """A 32-hex-digit id whose order is the order of creation within this process (time first).

    48 bits of milliseconds and 80 bits that are random for each new millisecond and count up
    within one, so ids sort by accept time even across processes (to the millisecond).
    """
    global _last_id_ms, _last_id_tail
    ms = int((time.time() if now is None else now) * 1000)
    if ms <= _last_id_ms:
        ms, tail = _last_id_ms, _last_id_tail + 1
    else:
        tail = secrets.randbits(79)  # room to count up without overflowing 80 bits
    _last_id_ms, _last_id_tail = ms, tail
    return f"{ms:012x}{tail:020x}"


def new_message(
    *, route: str, method: str, target: str, headers: Headers, body: bytes, idempotency_key: str | None,
    now: float, message_id: str | None = None,
) -> Message:
    """A message ready to be accepted; without a caller's key its id is its key."""
    message_id = message_id or new_id(now)
    return Message(
        id=message_id, route=route, method=method, target=target, headers=headers, body=body, size=len(body),
        idempotency_key=idempotency_key or message_id, accepted_at=now, queued_at=now, updated_at=now,
        next_attempt_at=now,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to: an upstream status, or the kind of failure that gave none.

    `error` uses the sidecar's error kinds (errors.py): connect_failure, upstream_reset, timeout,
    circuit_open, overloaded, bad_upstream_response.
    """

    status: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds, from the upstream's Retry-After or the open breaker


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


# Statuses that say "not now" rather than "never": the same request may succeed later.
RETRY_STATUSES = frozenset({408, 425, 429})
# While the breaker is open nothing was sent: waiting spends no attempt.
NOT_SENT = frozenset({"circuit_open"})


def classify(outcome: Outcome) -> Verdict:
    """2xx: delivered. 408, 425, 429, 5xx, any failure without a response: later. Anything else: never."""
    if outcome.status is None:
        return Verdict.RETRY
    if 200 <= outcome.status < 300:
        return Verdict.DELIVERED
    if outcome.status in RETRY_STATUSES or outcome.status >= 500:
        return Verdict.RETRY
    # Other 4xx, redirects (never followed) and stray 1xx: the same request will not do better.
    return Verdict.DEAD


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    attempts: int  # the message's attempt count after this outcome
    next_attempt_at: float | None = None  # for RETRY
    dead_reason: str | None = None  # for DEAD: rejected, max_attempts or expired


class Schedule:
    """Decides what happens to a message after an attempt, per the route's delivery policy."""

    def __init__(
        self, policy: RouteDelivery, clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.random = random

    def deadline(self, message: Message) -> float:
        return message.queued_at + self.policy.ttl

    def expired(self, message: Message) -> bool:
        """Past its ttl: it goes dead without another attempt."""
        return self.clock() >= self.deadline(message)

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `attempts` attempts: full jitter, or Retry-After capped at `max`."""
        cap = self.policy.backoff.max
        if retry_after is not None:
            return min(max(0.0, retry_after), cap)
        exponent = min(max(attempts - 1, 0), 62)  # 2**62 s is past any cap; avoids float overflow
        return self.random() * min(cap, self.policy.backoff.base * 2.0**exponent)

    def decide(self, message: Message, outcome: Outcome) -> Decision:
        now = self.clock()
        verdict = classify(outcome)
        sent = outcome.error not in NOT_SENT
        attempts = message.attempts + (1 if sent else 0)
        if verdict is Verdict.DELIVERED:
            return Decision(Verdict.DELIVERED, attempts)
        if verdict is Verdict.DEAD:
            return Decision(Verdict.DEAD, attempts, dead_reason="rejected")
        if attempts >= self.policy.max_attempts:
            return Decision(Verdict.DEAD, attempts, dead_reason="max_attempts")
        wait = self.backoff(attempts, outcome.retry_after)
        if not sent and outcome.retry_after is None:
            wait = self.policy.backoff.base  # the breaker did not say when: look again soon
        next_at = now + wait
        if next_at >= self.deadline(message):
            return Decision(Verdict.DEAD, attempts, dead_reason="expired")
        return Decision(Verdict.RETRY, attempts, next_attempt_at=next_at)
