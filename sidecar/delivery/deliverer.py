"""One route's delivery loop: claim due messages, send each, record what came of it.

It knows nothing of HTTP: `send(message) -> Outcome` is injected (the proxy passes one that runs
the route's stack with its synchronous retries off), and so is `breaker_open()`: while the route's
breaker is open the loop claims nothing, so waiting spends no attempts.

Concurrency 1 claims the first messages of the line (store `ordered=True`, up to ORDERED_BATCH)
and sends them one at a time: the upstream sees messages in the order they were accepted. When
one must wait for a retry, the rest of the batch goes back untouched, behind it, and the next
claims take one message, doubling while they go through (a failing upstream does not make every
retry claim and release a whole batch). A message is sent only while at least half of its lease
is left, which covers one attempt: the rest goes back and is claimed again under a fresh lease,
so no other worker takes a message this one is still sending. More than 1 claims up to that many
due messages at once, in no particular order.

An outcome is recorded while the next message is sent, across batches too: the store group-commits
the records (and the next claim) instead of each send waiting for an fsync. That is safe because a
message stays leased to this worker until its record lands: nobody else can claim it, and a crash
before the record means it is delivered again after the lease (at least once, never lost). At most
MAX_UNRECORDED outcomes wait to be recorded; a retry and stop() wait for all of them.

`stop(grace)` lets attempts in flight finish for up to `grace` seconds, then cancels them and gives
their messages back to the queue (another worker, or the next start, delivers them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable

from sidecar.delivery.model import Decision, Message, Outcome, Schedule, Verdict
from sidecar.delivery.store import Store, StoreUnavailable

log = logging.getLogger("sidecar.delivery")

Send = Callable[[Message], Awaitable[Outcome]]
# Called after each message's outcome is recorded: metrics (sidecar_deliveries_total) and events.
OnDecision = Callable[[Message, Decision], None]
# Messages claimed at once from the head of an ordered line: one claim's commit per this many
# deliveries. Each is sent after the one before it was decided, while half its lease is left.
ORDERED_BATCH = 256
# Outcomes sent but not yet recorded: the sender waits for the oldest beyond this many (a slow store
# must not let sent-but-unrecorded messages, each redelivered after a crash, pile up).
MAX_UNRECORDED = 64


def new_owner() -> str:
    """A lease holder's name, unique per process: host, pid and a random part (pids repeat across pods)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Deliverer:
    def __init__(
        self, route: str, store: Store, schedule: Schedule, send: Send, *, owner: str, lease: float,
        breaker_open: Callable[[], bool] = lambda: False, on_decision: OnDecision | None = None,
        poll_interval: float = 0.5, purge_interval: float = 60.0,
    ) -> None:
        self.route = route
        self.store = store
        self.schedule = schedule
        self.send = send
        self.owner = owner  # unique per process: a lease names its holder
        self.lease = lease  # longer than one attempt can take (the route's total timeout), same for every worker
        self.breaker_open = breaker_open
        self.on_decision = on_decision
        self.poll_interval = poll_interval  # how often to look for due messages when nothing woke the loop
        self.purge_interval = purge_interval
        self.concurrency = schedule.policy.concurrency
        self._wake = asyncio.Event()
        self._stopping = False
        # Each task's claimed messages not sent yet, the one being sent first (released on stop).
        self._in_flight: dict[asyncio.Task[None], list[Message]] = {}
        # Outcome records under way (each message stays leased to us until its record lands).
        self._unrecorded: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._next_purge = 0.0
        self._batch = ORDERED_BATCH  # the next ordered claim's size: 1 after a retry, doubling back

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"deliver {self.route}")

    def wake(self) -> None:
        """Look for due messages now (call after an accept on this route)."""
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; in-flight attempts get `grace` seconds (shutdown.timeout), then go back to the queue."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=grace)
        unfinished = list(self._in_flight.items())
        for task, _ in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait([task for task, _ in unfinished], timeout=1.0)
        with contextlib.suppress(TimeoutError):  # a store that hangs: those come back when their lease passes
            async with asyncio.timeout(max(grace, 1.0)):
                await self._recorded()
        for _, messages in unfinished:
            for message in messages:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release(message.id, owner=self.owner, now=self.schedule.clock())
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                claimed = await self._claim()
            except StoreUnavailable as exc:
                log.warning("delivery of route %s paused: %s", self.route, exc)
                claimed = 0
            if self._stopping:
                break
            if claimed == 0 or len(self._in_flight) >= self.concurrency:
                await self._idle()
        if self._in_flight:  # stop(): attempts in flight get the rest of its grace
            await asyncio.wait(list(self._in_flight))

    async def _claim(self) -> int:
        await self._purge_now_and_then()
        free = self.concurrency - len(self._in_flight)
        if free <= 0 or self.breaker_open():
            return 0
        ordered = self.concurrency == 1
        claimed_at = self.schedule.clock()
        messages = await self._claim_due(self._batch if ordered else free, ordered, claimed_at)
        if not messages and ordered and self._unrecorded:
            # The line may start with messages whose records are still on their way (a store that
            # does not run calls in order): it is ours until they land, so claim again then.
            await self._recorded()
            claimed_at = self.schedule.clock()
            messages = await self._claim_due(self._batch, ordered, claimed_at)
        batches = [messages] if ordered and messages else [[message] for message in messages]
        for batch in batches:
            task = asyncio.create_task(self._deliver(batch, claimed_at), name=f"deliver {batch[0].id}")
            self._in_flight[task] = batch
            task.add_done_callback(self._finished)
        return len(messages)

    async def _claim_due(self, limit: int, ordered: bool, now: float) -> list[Message]:
        return await self.store.claim_due(
            self.route, owner=self.owner, now=now, lease=self.lease, limit=limit, ordered=ordered,
        )

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wake.set()  # a free slot, or the next in line may be due

    async def _idle(self) -> None:
        """Until woken (an accept, a finished attempt, stop) or the poll interval passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_interval):
                await self._wake.wait()
        self._wake.clear()

    async def _deliver(self, batch: list[Message], claimed_at: float) -> None:
        """Send the batch in order; `batch` shrinks as outcomes are decided (stop() releases the rest).

        Returns once the last one is sent: its outcome may still be on its way to the store.
        """
        send_before = claimed_at + self.lease / 2  # the other half covers the attempt
        size = len(batch)
        while batch:
            message = batch[0]
            if self.schedule.clock() > send_before:
                await self._give_back(batch)  # claimed again at once, under a fresh lease
                return
            decision, outcome = await self._attempt(message)
            record = asyncio.create_task(self._record_and_report(message, decision, outcome))
            self._unrecorded.add(record)
            record.add_done_callback(self._unrecorded.discard)
            batch.pop(0)
            if decision.verdict is Verdict.RETRY:
                self._batch = 1
                # The head waits for its retry; the others go back untouched, behind it.
                await self._give_back(batch)
                return
            while len(self._unrecorded) >= MAX_UNRECORDED:  # each round at least one record lands
                await asyncio.wait(set(self._unrecorded), return_when=asyncio.FIRST_COMPLETED)
        if size >= self._batch:
            self._batch = min(ORDERED_BATCH, 2 * self._batch)

    async def _give_back(self, batch: list[Message]) -> None:
        """Release the messages not sent yet, after every outcome before them is recorded."""
        if not batch:
            return
        await self._recorded()
        now = self.schedule.clock()
        await asyncio.gather(
            *(self.store.release(rest.id, owner=self.owner, now=now) for rest in batch),
            return_exceptions=True,  # unreleased ones come back when their lease passes
        )
        batch.clear()

    async def _recorded(self) -> None:
        """Until every outcome sent so far is recorded (or failed to be: then its lease brings it back)."""
        if self._unrecorded:
            await asyncio.wait(set(self._unrecorded))

    async def _attempt(self, message: Message) -> tuple[Decision, Outcome]:
        if self.schedule.expired(message):
            decision = Decision(Verdict.DEAD, message.attempts, dead_reason="expired")
            outcome = Outcome()
        else:
            try:
                outcome = await self.send(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in send must not stop the route's deliveries: try again later
                log.exception("delivery of %s on route %s failed unexpectedly", message.id, self.route)
                outcome = Outcome(error="internal")
            decision = self.schedule.decide(message, outcome)
        return decision, outcome

    async def _record_and_report(self, message: Message, decision: Decision, outcome: Outcome) -> None:
        try:
            recorded = await self._record(message, decision, outcome)
        except StoreUnavailable as exc:
            # The lease runs out and the message is tried again: at least once, never lost.
            log.warning("outcome of %s on route %s not recorded: %s", message.id, self.route, exc)
            return
        if recorded and self.on_decision is not None:
            self.on_decision(message, decision)

    async def _record(self, message: Message, decision: Decision, outcome: Outcome) -> bool:
        """Store the decision; False when the lease had passed and another worker holds the message."""
        now, attempts = self.schedule.clock(), decision.attempts
        if decision.verdict is Verdict.DELIVERED:
            return await self.store.mark_delivered(
                message.id, owner=self.owner, now=now, attempts=attempts, status=outcome.status or 200
            )
        if decision.verdict is Verdict.DEAD:
            return await self.store.mark_dead(
                message.id, owner=self.owner, now=now, attempts=attempts, reason=decision.dead_reason or "rejected",
                error=outcome.error, status=outcome.status,
            )
        return await self.store.reschedule(
            message.id, owner=self.owner, now=now, attempts=attempts,
            next_attempt_at=decision.next_attempt_at or now, error=outcome.error, status=outcome.status,
        )

    async def _purge_now_and_then(self) -> None:
        now = self.schedule.clock()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_interval
            await self.store.purge(self.route, before=now - self.schedule.policy.retention)
