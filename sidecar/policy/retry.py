"""The retry decision: given an attempt that failed in a way `retries.on` lists, retry after
how long, or skip, and why. A pure function of its arguments; the retry layer feeds it and
acts on the answer.

A listed failure is retried when every one of these holds, checked in this order (the first
that fails is the skip reason, counted in sidecar_retries_skipped_total):
  attempts_exhausted    tries left (route's `attempts`, or the caller's lower x-sidecar-max-attempts)
  upgrade               a WebSocket handshake is retried only on connect-failure (provably unsent)
  non_idempotent        GET/HEAD/OPTIONS/PUT/DELETE/TRACE; other methods only on connect-failure
                        (provably unsent), with an Idempotency-Key, or with `non_idempotent: true`
  body_too_large        the body can be sent again: buffered (<= max_body) or not yet started
  retry_after_too_long  a Retry-After on 429/503 is at most `retry_after_max`
  deadline              the wait ends before the total deadline
  budget                the route's retry budget has room
The wait is full-jitter exponential backoff (`base * 2**retries` capped at `max`), or the
upstream's Retry-After on a 429/503 that carries one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from sidecar.config.schema import Retries
from sidecar.policy.retry_budget import RetryBudget

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Statuses whose Retry-After header says when to come back.
RETRY_AFTER_STATUSES = frozenset({"429", "503"})
Jitter = Callable[[float, float], float]  # (low, high) -> a wait in between, e.g. random.uniform


@dataclass(frozen=True, slots=True)
class Retry:
    after: float  # seconds to wait before the next attempt


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str  # attempts_exhausted, upgrade, non_idempotent, body_too_large, retry_after_too_long, deadline, budget


def decide(
    policy: Retries,
    condition: str,
    *,
    retries: int,
    attempts: int,
    max_attempts: int,
    method: str,
    idempotency_key: bool,
    body_replayable: bool,
    retry_after: str | None,
    now: float,
    deadline: float,
    wall_now: float,
    budget: RetryBudget,
    jitter: Jitter,
    upgrade: bool = False,
) -> Retry | Skip:
    """Whether to retry an attempt that failed with `condition` (connect-failure, reset,
    timeout, or a status code as text), listed in `policy.on`.

    retries: retries made so far (the backoff exponent); attempts: attempts made so far, of
    `max_attempts` allowed; retry_after: the response's Retry-After header, if any; now and
    deadline: loop time; wall_now: Unix time, for a Retry-After date. The budget is asked,
    not spent: the caller spends it when it retries.
    """
    if attempts >= max_attempts:
        return Skip("attempts_exhausted")
    if upgrade and condition != "connect-failure":
        return Skip("upgrade")
    if (
        method not in IDEMPOTENT
        and condition != "connect-failure"
        and not policy.non_idempotent
        and not idempotency_key
    ):
        return Skip("non_idempotent")
    if not body_replayable:
        return Skip("body_too_large")
    wait = jitter(0.0, min(policy.backoff.max, policy.backoff.base * 2**retries))
    if condition in RETRY_AFTER_STATUSES:
        after = retry_after_seconds(retry_after, wall_now)
        if after is not None:
            if after > policy.retry_after_max:
                return Skip("retry_after_too_long")
            wait = after
    if now + wait >= deadline:
        return Skip("deadline")
    if not budget.has_room():
        return Skip("budget")
    return Retry(wait)


def retry_after_seconds(value: str | None, wall_now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit() alone also takes "²", which float() refuses
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - wall_now)
