"""Retries: only when safe, within attempts, deadline and budget, with jittered backoff.

An attempt is retried when its failure is listed in `retries.on` AND every one of these holds
(else the reason is counted in sidecar_retries_skipped_total and the failure goes back as is):
  attempts_exhausted    tries left (route's `attempts`, or the caller's lower x-sidecar-max-attempts)
  non_idempotent        GET/HEAD/OPTIONS/PUT/DELETE/TRACE; other methods only on connect-failure
                        (provably unsent), with an Idempotency-Key, or with `non_idempotent: true`
  body_too_large        the body can be sent again: buffered (<= max_body, read whole by the proxy) or not yet started
  retry_after_too_long  a Retry-After on 429/503 is at most `retry_after_max`
  deadline              the backoff ends before the total deadline
  budget                the route's retry budget has room
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from sidecar.body import CallerBody
from sidecar.call import Call, Handler, Layer, passthrough
from sidecar.config.schema import Retries
from sidecar.errors import CircuitOpen, ConnectFailure, UpstreamError, UpstreamReset, UpstreamTimeout
from sidecar.events import EventBus
from sidecar.layers.retry_budget import RetryBudget
from sidecar.metrics import RouteMetrics
from sidecar.upstream_client import UpstreamResponse

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CONDITIONS = {ConnectFailure.kind: "connect-failure", UpstreamReset.kind: "reset", UpstreamTimeout.kind: "timeout"}
Jitter = Callable[[float, float], float]


def retry_layer(
    route: str, policy: Retries, budget: RetryBudget, metrics: RouteMetrics, events: EventBus,
    jitter: Jitter = random.uniform,
) -> Layer:
    if policy.attempts <= 1:
        return passthrough
    on_errors = frozenset(c for c in policy.on if isinstance(c, str))
    on_status = frozenset(c for c in policy.on if isinstance(c, int))
    loop = asyncio.get_running_loop()

    def wrap(inner: Handler) -> Handler:
        async def with_retries(call: Call) -> UpstreamResponse:
            budget.deposit()
            attempts = policy.attempts if call.max_attempts is None else min(policy.attempts, call.max_attempts)
            retry = 0
            previous: UpstreamResponse | UpstreamError | None = None
            while True:
                failure: UpstreamError | UpstreamResponse
                try:
                    failure = response = await inner(call)
                except CircuitOpen:
                    if previous is None:
                        raise
                    # The breaker opened on the attempt before this retry: the caller gets
                    # that attempt's real answer rather than our fail-fast.
                    return _deliver(previous)
                except UpstreamError as error:
                    failure, reason = error, CONDITIONS.get(error.kind)
                    if reason not in on_errors:
                        _discard(previous)
                        raise
                except BaseException:
                    _discard(previous)  # cancelled, or the caller failed: nothing goes back
                    raise
                else:
                    if response.status not in on_status:
                        _discard(previous)
                        return response
                    reason = str(response.status)
                _discard(previous)
                previous = None
                wait = min(policy.backoff.max, policy.backoff.base * 2**retry)
                wait = jitter(0.0, wait)
                skip = _why_not(call, attempts, reason, policy)
                if skip is None and isinstance(failure, UpstreamResponse) and failure.status in (429, 503):
                    after = _retry_after(failure.headers.get("Retry-After"))
                    if after is not None:
                        if after > policy.retry_after_max:
                            skip = "retry_after_too_long"
                        wait = after
                if skip is None and loop.time() + wait >= call.deadline:
                    skip = "deadline"
                if skip is None and not budget.try_withdraw():
                    skip = "budget"
                    events.publish_limited("retry_budget_exhausted", route)
                if skip is not None:
                    metrics.retry_skipped(skip)
                    return _deliver(failure)
                metrics.retried(reason)
                previous = failure  # kept until the retry has an answer
                await asyncio.sleep(wait)
                call.avoid = call.endpoint
                retry += 1

        return with_retries

    return wrap


def _deliver(failure: UpstreamResponse | UpstreamError) -> UpstreamResponse:
    if isinstance(failure, UpstreamError):
        raise failure
    return failure


def _discard(failure: UpstreamResponse | UpstreamError | None) -> None:
    if isinstance(failure, UpstreamResponse):
        failure.release()


def _why_not(call: Call, attempts: int, reason: str, policy: Retries) -> str | None:
    if call.attempts >= attempts:
        return "attempts_exhausted"
    if (
        call.method not in IDEMPOTENT
        and reason != "connect-failure"
        and not policy.non_idempotent
        and "Idempotency-Key" not in call.headers
    ):
        return "non_idempotent"
    if isinstance(call.body, CallerBody) and call.body.started:
        return "body_too_large"
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
