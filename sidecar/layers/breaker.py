"""Circuit breaker per route: fail fast while the upstream is known broken, probe to come back.

The breaker is pybreaker's, with pybreaker's rules (consecutive failures open it,
reset_timeout later it lets a probe through, success_threshold probes close it).
pybreaker has no asyncio support, so this adapter:
  - checks admission before an attempt: open -> `circuit_open` at once; half-open ->
    exactly one probe in flight (pybreaker alone would admit every caller);
  - runs the attempt outside pybreaker and records its outcome afterwards,
    synchronously, through `breaker.calling()`. A cancelled attempt (the caller went
    away) or the caller's own failure is recorded as neither success nor failure;
  - never replaces the tripping attempt's response (throw_new_error_on_trip=False).
The optional failure-rate rule (failure_rate.py) opens the same breaker through
pybreaker's API, so state, metrics and admin see one breaker.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

import pybreaker
from aiohttp import ClientResponse

from sidecar.call import Call, Handler, Layer, passthrough
from sidecar.config.schema import CircuitBreaker
from sidecar.errors import (
    BadUpstreamResponse,
    CircuitOpen,
    ConnectFailure,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.layers.failure_rate import FailureRateWindow
from sidecar.metrics import RouteMetrics

STATE_LABELS = {pybreaker.STATE_CLOSED: "closed", pybreaker.STATE_OPEN: "open", pybreaker.STATE_HALF_OPEN: "half_open"}
# The failure_on name of each upstream error kind; an invalid response counts as a reset.
FAILURE_NAMES = {
    ConnectFailure.kind: "connect-failure", UpstreamReset.kind: "reset", BadUpstreamResponse.kind: "reset",
    UpstreamTimeout.kind: "timeout",
}


class _AttemptFailed(Exception):
    """Raised inside `breaker.calling()` so pybreaker counts a failure it did not see happen."""


class RouteBreaker:
    def __init__(self, route: str, policy: CircuitBreaker, metrics: RouteMetrics, clock: Callable[[], float]) -> None:
        self.route = route
        self.policy = policy
        self._metrics = metrics
        self._rate = FailureRateWindow(policy.failure_rate, clock) if policy.failure_rate else None
        self._failure_names = frozenset(c for c in policy.failure_on if isinstance(c, str))
        self._failure_codes = frozenset(c for c in policy.failure_on if isinstance(c, int))
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold, reset_timeout=policy.reset_timeout,
            success_threshold=policy.success_threshold, throw_new_error_on_trip=False,
            state_storage=self.storage, listeners=[_Listener(self)], name=route,
        )
        self._probing = False
        metrics.breaker_entered("closed")

    @property
    def state(self) -> str:
        """closed, open or half_open."""
        return STATE_LABELS[self.storage.state]

    def seconds_until_probe(self) -> float:
        opened_at = self.storage.opened_at
        if opened_at is None:
            return 0.0
        return self.policy.reset_timeout - (datetime.now(UTC) - opened_at).total_seconds()

    def admit(self) -> bool:
        """Let an attempt through or raise CircuitOpen. True when the attempt is the half-open probe."""
        state = self.storage.state
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN:
            wait = self.seconds_until_probe()
            if wait > 0:
                self._reject(f"the circuit breaker of route {self.route} is open", wait)
            self.breaker.half_open()  # now, so metrics show half_open while the probe runs
        if self._probing:
            self._reject(f"the circuit breaker of route {self.route} is half-open and a probe is deciding", 1.0)
        self._probing = True
        return True

    def _reject(self, message: str, wait: float) -> None:
        self._metrics.breaker_rejected()
        raise CircuitOpen(message, retry_after=max(1, math.ceil(wait)))

    def failed_error(self, error: UpstreamError) -> bool:
        return FAILURE_NAMES.get(error.kind) in self._failure_names

    def failed_status(self, status: int) -> bool:
        return status in self._failure_codes or ("5xx" in self._failure_names and 500 <= status <= 599)

    def record(self, failed: bool, probe: bool) -> None:
        if probe:
            self._probing = False
        elif self.storage.state != pybreaker.STATE_CLOSED:
            return  # admitted before the breaker opened: its outcome is old news
        try:
            with self.breaker.calling():
                if failed:
                    raise _AttemptFailed
        except (_AttemptFailed, pybreaker.CircuitBreakerError):
            pass

    def abandon(self, probe: bool) -> None:
        """The attempt ended without an upstream verdict (cancelled, or the caller failed)."""
        if probe:
            self._probing = False

    def count_for_rate(self, failed: bool) -> None:
        if self._rate is not None and self._rate.record(failed) and self.storage.state == pybreaker.STATE_CLOSED:
            self.breaker.open()

    def entered(self, state: str) -> None:
        self._metrics.breaker_transition(STATE_LABELS[state])
        if self._rate is not None:
            self._rate.clear()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: RouteBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: pybreaker.CircuitBreakerState) -> None:
        if old is not None and getattr(old, "name", None) == new.name:
            return  # calls in flight when it tripped report open -> open
        self._owner.entered(new.name)

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self._owner.count_for_rate(True)

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        self._owner.count_for_rate(False)


def breaker_layer(breaker: RouteBreaker | None) -> Layer:
    if breaker is None:  # circuit_breaker.enabled: false
        return passthrough

    def wrap(inner: Handler) -> Handler:
        async def guarded(call: Call) -> ClientResponse:
            probe = breaker.admit()
            try:
                response = await inner(call)
            except UpstreamError as error:
                breaker.record(breaker.failed_error(error), probe)
                raise
            except BaseException:
                breaker.abandon(probe)
                raise
            breaker.record(breaker.failed_status(response.status), probe)
            return response

        return guarded

    return wrap
