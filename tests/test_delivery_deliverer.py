"""The delivery loop against a real upstream on loopback, through a small aiohttp send function.

The proxy will pass a send that runs the route's stack; here a plain ClientSession stands in for
it, so these tests check the loop: order, retries, dead letters, breaker pauses, shutdown, leases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
from yarl import URL

from sidecar.config.delivery import RouteDelivery
from sidecar.config.units import decode_hook
from sidecar.delivery.deliverer import MAX_UNRECORDED, Deliverer, OnDecision, Send
from sidecar.delivery.model import Message, Outcome, Schedule, Status, new_message
from sidecar.delivery.sqlite_store import SqliteStore
from sidecar.delivery.store import Limits, StoreUnavailable
from tests.conftest import Gate, Hit, Upstream, answering, echo
from tests.processes import free_port

LIMITS = Limits(max_pending=1000, max_bytes=1 << 20, dedupe_window=3600.0)
FAST = {"backoff": {"base": "10ms", "max": "50ms"}}  # retries within milliseconds, on the real clock


def policy(**values: object) -> RouteDelivery:
    return msgspec.convert({**FAST, **values}, RouteDelivery, strict=False, dec_hook=decode_hook)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "delivery.sqlite3")
    yield opened
    await opened.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent", "Accept",
                                                                               "Accept-Encoding")) as opened:
        yield opened


def sender(session: aiohttp.ClientSession, base: Callable[[], str]) -> Send:
    """Send a message as its request, with its Idempotency-Key, to whatever `base()` says now."""

    async def send(message: Message) -> Outcome:
        headers = [*message.headers, ("Idempotency-Key", message.idempotency_key)]
        url = URL(base() + message.target, encoded=True)
        try:
            async with asyncio.timeout(5):
                async with session.request(message.method, url, headers=headers, data=message.body) as response:
                    await response.read()
                    return Outcome(status=response.status)
        except aiohttp.ClientConnectorError:
            return Outcome(error="connect_failure")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return Outcome(error="upstream_reset")
        except TimeoutError:
            return Outcome(error="timeout")

    return send


async def accept(store: SqliteStore, number: int, route: str = "hooks", now: float | None = None) -> str:
    message = new_message(
        route=route, method="POST", target="/hooks", headers=(("content-type", "text/plain"),),
        body=f"message {number}".encode(), idempotency_key=f"k{number}", now=time.time() if now is None else now,
    )
    return (await store.accept(message, LIMITS)).id


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not await check():
            await asyncio.sleep(0.01)


def delivered(store: SqliteStore, count: int, route: str = "hooks") -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stats = await store.stats(now=time.time())
        return route in stats and stats[route].counts[Status.DELIVERED] == count

    return check


def deliverer(
    store: SqliteStore, send: Send, route_policy: RouteDelivery, owner: str = "worker-1", lease: float = 30.0,
    breaker_open: Callable[[], bool] = lambda: False, on_decision: OnDecision | None = None,
) -> Deliverer:
    return Deliverer("hooks", store, Schedule(route_policy), send, owner=owner, lease=lease,
                     breaker_open=breaker_open, on_decision=on_decision, poll_interval=0.02)


def keys(hits: list[Hit]) -> list[str]:
    return [hit.headers["Idempotency-Key"] for hit in hits]


async def test_an_upstream_failing_for_a_while_gets_everything_once_and_in_order(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.on("/hooks", answering(503), answering(503), answering(429), echo)
    ids = [await accept(store, number) for number in range(5)]
    loop = deliverer(store, sender(session, lambda: upstream.url), policy())
    loop.start()
    try:
        await eventually(delivered(store, 5))
    finally:
        await loop.stop(grace=1.0)
    # The head is retried until it passes; nothing behind it goes first (concurrency 1).
    assert keys(upstream.hits) == ["k0", "k0", "k0", "k0", "k1", "k2", "k3", "k4"]
    assert [hit.body for hit in upstream.hits[3:]] == [f"message {n}".encode() for n in range(5)]
    assert all(hit.headers["content-type"] == "text/plain" for hit in upstream.hits)
    first = await store.get(ids[0])
    assert first is not None and first.attempts == 4 and first.last_status == 200 and first.body == b""


async def test_connect_failures_are_retried_until_the_upstream_listens(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    target = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    [message_id] = [await accept(store, 0)]
    loop = deliverer(store, sender(session, lambda: target["url"]), policy())
    loop.start()
    try:
        async def failed_twice() -> bool:
            found = await store.get(message_id)
            return found is not None and found.attempts >= 2

        await eventually(failed_twice)
        waiting = await store.get(message_id)
        assert waiting is not None and waiting.last_error == "connect_failure" and waiting.status is not Status.DEAD
        target["url"] = upstream.url  # the upstream is back
        await eventually(delivered(store, 1))
    finally:
        await loop.stop(grace=1.0)
    assert keys(upstream.hits) == ["k0"]


async def test_a_rejected_message_is_dead_at_once_and_redrive_delivers_it(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.on("/hooks", answering(400), echo)
    message_id = await accept(store, 0)
    loop = deliverer(store, sender(session, lambda: upstream.url), policy())
    loop.start()
    try:
        async def dead() -> bool:
            found = await store.get(message_id)
            return found is not None and found.status is Status.DEAD

        await eventually(dead)
        record = await store.get(message_id)
        assert record is not None and (record.attempts, record.dead_reason, record.last_status) == (1, "rejected", 400)
        assert len(upstream.hits) == 1
        assert await store.redrive("hooks", now=time.time()) == 1
        loop.wake()
        await eventually(delivered(store, 1))
    finally:
        await loop.stop(grace=1.0)
    assert keys(upstream.hits) == ["k0", "k0"]


async def test_an_open_breaker_pauses_deliveries_without_spending_attempts(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    state = {"open": True, "asked": 0}

    def breaker_open() -> bool:
        state["asked"] += 1
        return bool(state["open"])

    message_id = await accept(store, 0)
    loop = deliverer(store, sender(session, lambda: upstream.url), policy(), breaker_open=breaker_open)
    loop.start()
    try:
        async def asked_five_times() -> bool:
            return state["asked"] >= 5

        await eventually(asked_five_times)
        paused = await store.get(message_id)
        assert paused is not None and paused.status is Status.QUEUED and paused.attempts == 0
        assert upstream.hits == []
        state["open"] = False
        await eventually(delivered(store, 1))
    finally:
        await loop.stop(grace=1.0)
    assert len(upstream.hits) == 1


async def test_stop_gives_an_unfinished_attempt_back_to_the_queue_within_the_grace(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/hooks", gate)
    ids = [await accept(store, number) for number in range(3)]  # claimed together, sent one by one
    loop = deliverer(store, sender(session, lambda: upstream.url), policy())
    loop.start()
    await gate.until_waiting(1)
    async with asyncio.timeout(5):  # bounded: grace 0.2 s, then cancel and release
        await loop.stop(grace=0.2)
    gate.release.set()
    for message_id in ids:
        back = await store.get(message_id)
        assert back is not None and back.status is Status.QUEUED and back.lease_owner is None
        assert back.attempts == 0
    assert len(upstream.hits) == 1


async def test_concurrency_above_one_sends_in_parallel(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.on("/hooks", gate)
    for number in range(3):
        await accept(store, number)
    loop = deliverer(store, sender(session, lambda: upstream.url), policy(concurrency=3))
    loop.start()
    try:
        await gate.until_waiting(3)  # all three in flight at once
        gate.release.set()
        await eventually(delivered(store, 3))
    finally:
        await loop.stop(grace=1.0)
    assert sorted(keys(upstream.hits)) == ["k0", "k1", "k2"]


async def test_an_expired_message_goes_dead_without_being_sent(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    message_id = await accept(store, 0, now=time.time() - 10)
    decisions: list[str] = []
    loop = deliverer(store, sender(session, lambda: upstream.url), policy(ttl="1s"),
                     on_decision=lambda message, decision: decisions.append(f"{decision.verdict}"))

    async def dead() -> bool:
        found = await store.get(message_id)
        return found is not None and found.status is Status.DEAD

    loop.start()
    try:
        await eventually(dead)
    finally:
        await loop.stop(grace=1.0)
    record = await store.get(message_id)
    assert record is not None and record.dead_reason == "expired" and record.attempts == 0
    assert upstream.hits == [] and decisions == ["dead"]


async def test_a_message_held_by_a_crashed_worker_is_delivered_by_another_after_the_lease(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    message_id = await accept(store, 0)
    # The crashed worker claimed it and will never answer.
    assert [found.id for found in await store.claim_due(
        "hooks", owner="crashed", now=time.time(), lease=0.3, limit=1, ordered=True
    )] == [message_id]
    loop = deliverer(store, sender(session, lambda: upstream.url), policy(), owner="survivor", lease=0.3)
    loop.start()
    try:
        await eventually(delivered(store, 1))
    finally:
        await loop.stop(grace=1.0)
    assert keys(upstream.hits) == ["k0"]


async def test_a_send_that_raises_is_retried_not_fatal(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    calls = {"n": 0}
    real = sender(session, lambda: upstream.url)

    async def flaky(message: Message) -> Outcome:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in send")
        return await real(message)

    message_id = await accept(store, 0)
    loop = deliverer(store, flaky, policy())
    loop.start()
    try:
        await eventually(delivered(store, 1))
    finally:
        await loop.stop(grace=1.0)
    record = await store.get(message_id)
    assert record is not None and record.attempts == 2 and len(upstream.hits) == 1



class HeldMarks(SqliteStore):
    """The real store, whose delivered marks wait until `release` is set: a store slow to record.

    With `lost` set when they are released, they fail as if the process had died before writing
    them: the message stays leased, as on disk after a crash between the send and its record.
    """

    release: asyncio.Event
    lost = False
    entered = 0  # marks asked for
    landed = 0  # marks written

    async def mark_delivered(self, message_id: str, *, owner: str, now: float, attempts: int, status: int) -> bool:
        self.entered += 1
        await self.release.wait()
        if self.lost:
            raise StoreUnavailable("the process died before the mark was written")
        done = await super().mark_delivered(message_id, owner=owner, now=now, attempts=attempts, status=status)
        self.landed += 1
        return done


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[HeldMarks]:
    opened = await HeldMarks.open(tmp_path / "delivery.sqlite3")
    assert isinstance(opened, HeldMarks)
    opened.release = asyncio.Event()
    yield opened
    opened.release.set()
    await opened.close()


async def test_sends_go_ahead_of_their_records_in_order_at_most_max_unrecorded_of_them(
    held: HeldMarks, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    count = MAX_UNRECORDED + 6
    for number in range(count):
        await accept(held, number)
    real = sender(session, lambda: upstream.url)
    unrecorded_at_send: list[int] = []

    async def send(message: Message) -> Outcome:
        unrecorded_at_send.append(len(upstream.hits) - held.landed)  # sent before, not recorded yet
        return await real(message)

    loop = deliverer(held, send, policy())
    loop.start()
    try:
        await eventually(lambda: as_awaitable(held.entered >= MAX_UNRECORDED))
        assert len(upstream.hits) == MAX_UNRECORDED  # the sender waits for its records now
        held.release.set()
        await eventually(delivered(held, count))
    finally:
        await loop.stop(grace=1.0)
    assert keys(upstream.hits) == [f"k{number}" for number in range(count)]  # in order, each once
    assert max(unrecorded_at_send) == MAX_UNRECORDED - 1
    assert held.landed == count


async def test_a_crash_between_send_and_record_delivers_again_after_the_lease(
    held: HeldMarks, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    for number in range(5):
        await accept(held, number)
    crashed = deliverer(held, sender(session, lambda: upstream.url), policy(), owner="crashed", lease=1.0)
    crashed.start()
    await eventually(lambda: as_awaitable(held.entered == 5))  # all sent, none recorded
    held.lost = True
    held.release.set()
    await crashed.stop(grace=1.0)
    assert keys(upstream.hits) == ["k0", "k1", "k2", "k3", "k4"]
    assert (await held.stats(now=time.time()))["hooks"].counts[Status.DELIVERING] == 5  # still leased
    held.lost = False
    restarted = deliverer(held, sender(session, lambda: upstream.url), policy(), owner="restarted", lease=1.0)
    restarted.start()
    try:
        await eventually(delivered(held, 5))
    finally:
        await restarted.stop(grace=1.0)
    # At least once, in order: the unrecorded ones again, once the crashed worker's lease ran out.
    assert keys(upstream.hits) == ["k0", "k1", "k2", "k3", "k4"] * 2


async def test_a_message_is_sent_only_while_half_its_lease_is_left(
    store: SqliteStore, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    clock = {"now": time.time()}
    real = sender(session, lambda: upstream.url)
    lease_left: list[float] = []

    async def slow(message: Message) -> Outcome:
        record = await store.get(message.id)
        assert record is not None and record.lease_expires_at is not None
        lease_left.append(record.lease_expires_at - clock["now"])
        clock["now"] += 2.0  # each answer takes 2 s of the 10 s lease
        return await real(message)

    for number in range(6):
        await accept(store, number, now=clock["now"])
    loop = Deliverer("hooks", store, Schedule(policy(), clock=lambda: clock["now"]), slow, owner="worker-1",
                     lease=10.0, poll_interval=0.02)
    loop.start()
    try:
        await eventually(delivered(store, 6))
    finally:
        await loop.stop(grace=1.0)
    assert keys(upstream.hits) == [f"k{number}" for number in range(6)]
    # Claimed together; the fourth would start with 4 s left: it and the rest were claimed again.
    assert lease_left == pytest.approx([10.0, 8.0, 6.0, 10.0, 8.0, 6.0])


async def as_awaitable(value: bool) -> bool:
    return value
