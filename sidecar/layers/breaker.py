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

import logging
import math
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import pybreaker

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
from sidecar.proxy.call import Call, Handler, Layer, passthrough
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import RouteMetrics
from sidecar.wire.upstream_client import UpstreamResponse

log = logging.getLogger("sidecar.breaker")
RECENT_FAILURES = 10
Forced = Literal["open", "closed"]

STATE_LABELS = {pybreaker.STATE_CLOSED: "closed", pybreaker.STATE_OPEN: "open", pybreaker.STATE_HALF_OPEN: "half_open"}
# The failure_on name of each upstream error kind; an invalid response counts as a reset.
FAILURE_NAMES = {
    ConnectFailure.kind: "connect-failure", UpstreamReset.kind: "reset", BadUpstreamResponse.kind: "reset",
    UpstreamTimeout.kind: "timeout",
}


class _AttemptFailed(Exception):
    """Raised inside `breaker.calling()` so pybreaker counts a failure it did not see happen."""


class RouteBreaker:
    def __init__(
        self, route: str, policy: CircuitBreaker, metrics: RouteMetrics, clock: Callable[[], float], events: EventBus
    ) -> None:
        self.route = route
        self.policy = policy
        self._metrics = metrics
        self._events = events
        # Set by an operator through the admin API; wins over pybreaker until reset.
        self.forced: Forced | None = None
        self.recent_failures: deque[dict[str, str]] = deque(maxlen=RECENT_FAILURES)
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
        """closed, open or half_open; a forced state wins."""
        return self.forced or STATE_LABELS[self.storage.state]

    def force(self, state: Forced | None) -> None:
        """Force the breaker open or closed (operations override), or release it (None) to closed."""
        self.forced = state
        self._metrics.breaker_forced(state is not None)
        if state is None:
            self._probing = False
            self.breaker.close()  # pybreaker: closed, counters reset
            self._metrics.breaker_entered("closed")
        else:
            self._metrics.breaker_entered(state)
        self._events.publish("breaker_forced", self.route, state=state or "released")
        log.warning("breaker forced", extra={"route": self.route, "forced": state or "released"})

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows: state, why it opened, when it probes next."""
        opened_at = self.storage.opened_at if self.storage.state != pybreaker.STATE_CLOSED else None
        wait = self.seconds_until_probe() if self.storage.state == pybreaker.STATE_OPEN else None
        return {
            "route": self.route,
            "enabled": True,
            "state": self.state,
            "forced": self.forced is not None,
            "consecutive_failures": self.storage.counter,
            "opened_at": _iso(opened_at) if opened_at else None,
            "next_probe_at": _iso(datetime.now(UTC).timestamp() + max(0.0, wait)) if wait is not None else None,
            "recent_failures": list(self.recent_failures),
        }

    def seconds_until_probe(self) -> float:
        opened_at = self.storage.opened_at
        if opened_at is None:
            return 0.0
        return self.policy.reset_timeout - (datetime.now(UTC) - opened_at).total_seconds()

    def admit(self) -> bool:
        """Let an attempt through or raise CircuitOpen. True when the attempt is the half-open probe."""
        if self.forced == "open":
            self._reject(f"the circuit breaker of route {self.route} is forced open", self.policy.reset_timeout)
        if self.forced == "closed":
            return False
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

    def failure_of_error(self, error: UpstreamError) -> str | None:
        """The failure kind this error counts as, or None if it does not count."""
        return error.kind if FAILURE_NAMES.get(error.kind) in self._failure_names else None

    def failure_of_status(self, status: int) -> str | None:
        failed = status in self._failure_codes or ("5xx" in self._failure_names and 500 <= status <= 599)
        return f"status_{status}" if failed else None

    def record(self, failure: str | None, probe: bool) -> None:
        """The attempt's verdict: a failure kind, or None for a success."""
        if probe:
            self._probing = False
        elif self.forced is not None or self.storage.state != pybreaker.STATE_CLOSED:
            return  # forced, or admitted before the breaker opened: its outcome is old news
        failed = failure is not None
        if not failed and not probe and self._rate is None and self.storage.counter == 0:
            # The common case: a success while closed with no failures counted. pybreaker
            # would only reset a counter that is already 0, so skip its bookkeeping.
            return
        if failure is not None:
            self.recent_failures.append({"kind": failure, "time": _iso(datetime.now(UTC).timestamp())})
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
        label = STATE_LABELS[state]
        self._metrics.breaker_transition(label)
        if self._rate is not None:
            self._rate.clear()
        self._events.publish("breaker", self.route, state=label)
        log.warning("breaker %s", label, extra={"route": self.route, "state": label})


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
        async def guarded(call: Call) -> UpstreamResponse:
            probe = breaker.admit()
            try:
                response = await inner(call)
            except UpstreamError as error:
                breaker.record(breaker.failure_of_error(error), probe)
                raise
            except BaseException:
                breaker.abandon(probe)
                raise
            breaker.record(breaker.failure_of_status(response.status), probe)
            return response

        return guarded

    return wrap


def _iso(timestamp: float | datetime) -> str:
    moment = timestamp if isinstance(timestamp, datetime) else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
