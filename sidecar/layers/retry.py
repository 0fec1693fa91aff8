"""Retries: the layer that acts on `sidecar.policy.retry.decide`, where the rules and the skip
reasons are written down.

A first attempt that succeeds, or fails in a way `retries.on` does not list, goes straight
back: no decision, no extra coroutine. A listed failure goes to `decide`; on "retry after X"
the layer spends the budget, counts the retry, waits and tries again (avoiding the endpoint
that just failed); on "skip because Y" it counts the reason and the caller gets the failure
as it is. The latest listed failure is held (its response unreleased) until a retry has an
answer, so a caller whose retries run out still gets a real answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from sidecar.config.schema import Retries
from sidecar.errors import CircuitOpen, ConnectFailure, UpstreamError, UpstreamReset, UpstreamTimeout
from sidecar.policy.retry import Jitter, Skip, decide
from sidecar.policy.retry_budget import RetryBudget
from sidecar.proxy.call import Call, Handler, Layer, Response, passthrough
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import RouteMetrics

# The `retries.on` name of each upstream error kind (a bad response is never retried).
CONDITIONS = {ConnectFailure.kind: "connect-failure", UpstreamReset.kind: "reset", UpstreamTimeout.kind: "timeout"}
Outcome = Response | UpstreamError


def retry_layer(
    route: str, policy: Retries, budget: RetryBudget, metrics: RouteMetrics, events: EventBus,
    jitter: Jitter | None = None, wall_clock: Callable[[], float] = time.time,
) -> Layer:
    if policy.attempts <= 1:
        return passthrough
    jitter = random.uniform if jitter is None else jitter  # looked up now, so a test can replace it
    on_errors = frozenset(c for c in policy.on if isinstance(c, str))
    on_status = frozenset(c for c in policy.on if isinstance(c, int))
    loop = asyncio.get_running_loop()

    def listed(outcome: Outcome) -> str | None:
        """The `retries.on` condition this outcome is, or None if it is not retried."""
        if isinstance(outcome, UpstreamError):
            condition = CONDITIONS.get(outcome.kind)
            return condition if condition in on_errors else None
        return str(outcome.status) if outcome.status in on_status else None

    def wrap(inner: Handler) -> Handler:
        async def with_retries(call: Call) -> Response:
            budget.deposit()
            max_attempts = policy.attempts if call.max_attempts is None else min(policy.attempts, call.max_attempts)
            try:
                response = await inner(call)
            except UpstreamError as error:
                condition = listed(error)
                if condition is None:
                    raise
                return await retrying(call, max_attempts, error, condition)
            if response.status not in on_status:
                return response
            return await retrying(call, max_attempts, response, str(response.status))

        async def retrying(call: Call, max_attempts: int, failure: Outcome, condition: str) -> Response:
            retries = 0
            while True:
                decision = decide(
                    policy, condition, retries=retries, attempts=call.attempts, max_attempts=max_attempts,
                    method=call.method, idempotency_key="Idempotency-Key" in call.headers,
                    body_replayable=call.body_replayable,
                    retry_after=None if isinstance(failure, UpstreamError) else failure.headers.get("Retry-After"),
                    now=loop.time(), deadline=call.deadline, wall_now=wall_clock(), budget=budget, jitter=jitter,
                    upgrade=call.upgrade,
                )
                if isinstance(decision, Skip):
                    metrics.retry_skipped(decision.reason)
                    if decision.reason == "budget":
                        events.publish_limited("retry_budget_exhausted", route)
                    return _deliver(failure)
                budget.spend()
                metrics.retried(condition)
                retries += 1
                answer: Outcome
                try:
                    await asyncio.sleep(decision.after)
                    call.avoid = call.endpoint
                    answer = await inner(call)
                except CircuitOpen:
                    # The breaker opened on the attempt before this retry: the caller gets
                    # that attempt's real answer rather than our fail-fast.
                    return _deliver(failure)
                except UpstreamError as error:
                    answer = error
                except BaseException:
                    _discard(failure)  # cancelled, or the caller failed: nothing goes back
                    raise
                _discard(failure)  # the retry's answer replaces it
                next_condition = listed(answer)
                if next_condition is None:
                    return _deliver(answer)
                failure, condition = answer, next_condition

        return with_retries

    return wrap


def _deliver(outcome: Outcome) -> Response:
    if isinstance(outcome, UpstreamError):
        raise outcome
    return outcome


def _discard(outcome: Outcome) -> None:
    if not isinstance(outcome, UpstreamError):
        outcome.release()
