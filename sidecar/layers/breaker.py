"""Circuit breaker per route: fail fast while the upstream is known broken, probe to come back.

The breaker is pybreaker's state (closed, open, half-open, its counters, its storage) with
pybreaker's rules: `failure_threshold` consecutive failures open it, `reset_timeout` later
it lets a probe through, `success_threshold` successful probes close it, a failed probe
re-opens it. pybreaker has no asyncio support and learns outcomes only from exceptions
raised inside its synchronous `call()`, where its listeners run in the middle of its own
bookkeeping. So this adapter:
  - checks admission before an attempt: open -> `circuit_open` at once; half-open ->
    exactly one probe in flight (pybreaker alone would admit every caller);
  - runs the attempt outside pybreaker and records its outcome afterwards, applying the
    rules above to pybreaker's storage and moving its state through its public
    open()/half_open()/close(). Every transition happens in one place (`_enter`), once:
    no listener, no exception as a signal, nothing re-enters the adapter;
  - measures reset_timeout on the injected clock (the loop's); the wall clock only labels
    moments shown to people (admin API, recent failures);
  - never replaces the tripping attempt's response. A cancelled attempt (the caller went
    away) or the caller's own failure counts as neither success nor failure.
The optional failure-rate rule (sidecar/policy/failure_rate.py) opens the same breaker, so
state, metrics and admin see one breaker.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
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
from sidecar.policy.failure_rate import FailureRateWindow
from sidecar.proxy.call import Call, Handler, Layer, Response, passthrough
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import RouteMetrics
from sidecar.telemetry.timestamps import iso, iso_now

log = logging.getLogger("sidecar.breaker")
RECENT_FAILURES = 10
Forced = Literal["open", "closed"]
CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN

STATE_LABELS = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
# The failure_on name of each upstream error kind; an invalid response counts as a reset.
FAILURE_NAMES = {
    ConnectFailure.kind: "connect-failure", UpstreamReset.kind: "reset", BadUpstreamResponse.kind: "reset",
    UpstreamTimeout.kind: "timeout",
}


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
        self._clock = clock
        self._opened_at: float | None = None  # clock time it last opened; None while closed
        self.storage = pybreaker.CircuitMemoryStorage(CLOSED)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold, reset_timeout=policy.reset_timeout,
            success_threshold=policy.success_threshold, state_storage=self.storage, name=route,
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
            if self.storage.state == CLOSED:
                self.storage.reset_counter()  # released to closed: counting starts afresh
            else:
                self._enter(CLOSED)
            self._metrics.breaker_entered("closed")
        else:
            self._metrics.breaker_entered(state)
        self._events.publish("breaker_forced", self.route, state=state or "released")
        log.warning("breaker forced", extra={"route": self.route, "forced": state or "released"})

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows: state, why it opened, when it probes next."""
        # Moments are kept on the injected clock; the wall clock only turns them into dates.
        wall, now = time.time(), self._clock()
        opened_at = self._opened_at
        wait = self.seconds_until_probe() if self.storage.state == OPEN else None
        return {
            "route": self.route,
            "enabled": True,
            "state": self.state,
            "forced": self.forced is not None,
            "consecutive_failures": self.storage.counter,
            "opened_at": iso(wall - (now - opened_at)) if opened_at is not None else None,
            "next_probe_at": iso(wall + max(0.0, wait)) if wait is not None else None,
            "recent_failures": list(self.recent_failures),
        }

    def refusing(self) -> bool:
        """Whether a call now would be refused without reaching the upstream: forced open, or open
        and not yet due for its probe (the state reads open until a call turns it half-open)."""
        return self.forced == "open" or (self.state == "open" and self.seconds_until_probe() > 0)

    def seconds_until_probe(self) -> float:
        if self._opened_at is None:
            return 0.0
        return self.policy.reset_timeout - (self._clock() - self._opened_at)

    def admit(self) -> bool:
        """Let an attempt through or raise CircuitOpen. True when the attempt is the half-open probe."""
        if self.forced == "open":
            self._reject(f"the circuit breaker of route {self.route} is forced open", self.policy.reset_timeout)
        if self.forced == "closed":
            return False
        state = self.storage.state
        if state == CLOSED:
            return False
        if state == OPEN:
            wait = self.seconds_until_probe()
            if wait > 0:
                self._reject(f"the circuit breaker of route {self.route} is open", wait)
            self._enter(HALF_OPEN)  # now, so metrics show half_open while the probe runs
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
        if self.forced is not None:
            return  # the operator decides while forced
        storage = self.storage
        state = storage.state
        if probe and state == HALF_OPEN:
            self._settle_probe(failure)
            return
        if state != CLOSED:
            return  # admitted before the breaker opened: its outcome is old news
        rate = self._rate
        if failure is None:
            # The common case is a success with nothing counted: no bookkeeping at all.
            if storage.counter:
                storage.reset_counter()  # any success ends a run of consecutive failures
            if rate is not None and rate.record(False):
                self._enter(OPEN)  # the success that brings the window to min_requests can trip it
            return
        self._remember(failure)
        storage.increment_counter()
        tripped_by_rate = rate is not None and rate.record(True)
        if storage.counter >= self.policy.failure_threshold or tripped_by_rate:
            self._enter(OPEN)

    def _settle_probe(self, failure: str | None) -> None:
        storage = self.storage
        if failure is not None:
            self._remember(failure)
            storage.increment_counter()
            self._enter(OPEN)  # a failed probe re-opens it for another reset_timeout
            return
        storage.reset_counter()
        storage.increment_success_counter()
        if storage.success_counter >= self.policy.success_threshold:
            self._enter(CLOSED)

    def _remember(self, failure: str) -> None:
        self.recent_failures.append({"kind": failure, "time": iso_now()})

    def abandon(self, probe: bool) -> None:
        """The attempt ended without an upstream verdict (cancelled, or the caller failed)."""
        if probe:
            self._probing = False

    def _enter(self, state: str) -> None:
        """The one place the breaker changes state: pybreaker's state and counters move through its
        public API (which resets its counters as its rules say), then metrics, events and logs hear of
        it, once per transition."""
        if state == OPEN:
            self.breaker.open()
            self._opened_at = self._clock()
        elif state == HALF_OPEN:
            self.breaker.half_open()
        else:
            self.breaker.close()
            self._opened_at = None
        label = STATE_LABELS[state]
        self._metrics.breaker_transition(label)
        if self._rate is not None:
            self._rate.clear()
        self._events.publish("breaker", self.route, state=label)
        log.warning("breaker %s", label, extra={"route": self.route, "state": label})


def breaker_layer(breaker: RouteBreaker | None) -> Layer:
    if breaker is None:  # circuit_breaker.enabled: false
        return passthrough

    def wrap(inner: Handler) -> Handler:
        async def guarded(call: Call) -> Response:
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

