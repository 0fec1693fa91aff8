"""One suite for both delivery stores: an SQLite file in tmp_path and a real redis-server.

Every test in the first part runs against both backends (the `store` fixture); the last part
checks what only one backend has (a file, group commit, a Redis that dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.config import parse_config
from sidecar.delivery.model import Message, Status, new_id, new_message
from sidecar.delivery.sqlite_store import SqliteStore
from sidecar.delivery.store import Limits, QueueFull, Store, StoreError, StoreUnavailable, open_store
from tests.redis_server import REDIS, RedisServer

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0  # a fixed "now" for everything but Redis's own idle clock (leases)
LIMITS = Limits(max_pending=1000, max_bytes=1 << 20, dedupe_window=3600.0)
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run installs it)")


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[Store]]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state" / "delivery.sqlite3"
        return Backend("sqlite", lambda: SqliteStore.open(path))
    from sidecar.delivery.redis_store import RedisStore

    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex}:"  # one queue per test in the shared server
    return Backend("redis", lambda: RedisStore.open(server.url, prefix=prefix))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    yield opened
    await opened.close()


def message(
    route: str = "hooks", body: bytes = b"payload", key: str | None = None, now: float = NOW, target: str = "/x"
) -> Message:
    return new_message(
        route=route, method="POST", target=target, headers=(("content-type", "application/json"),),
        body=body, idempotency_key=key, now=now,
    )


async def accept_all(store: Store, count: int, route: str = "hooks", now: float = NOW) -> list[str]:
    ids = []
    for number in range(count):
        accepted = await store.accept(message(route, target=f"/m/{number}", now=now), LIMITS, dedupe=False)
        ids.append(accepted.id)
    return ids


async def claim(store: Store, owner: str = "a", now: float = NOW, lease: float = 60.0, limit: int = 10,
                ordered: bool = False, route: str = "hooks") -> list[str]:
    claimed = await store.claim_due(route, owner=owner, now=now, lease=lease, limit=limit, ordered=ordered)
    return [found.id for found in claimed]


# -- the shared contract ---------------------------------------------------------------------


async def test_an_accepted_message_reads_back_exactly(store: Store) -> None:
    sent = new_message(
        route="hooks", method="PATCH", target="/a%2Fb?x=1&x=2",
        headers=(("content-type", "application/json"), ("x-tag", "one"), ("x-tag", "two"), ("x-note", "café")),
        body=bytes(range(256)) * 4, idempotency_key="k-1", now=NOW,
    )
    accepted = await store.accept(sent, LIMITS)
    assert (accepted.id, accepted.duplicate) == (sent.id, False)

    stored = await store.get(sent.id)
    assert stored == sent  # every field, headers in order with repeats, binary body
    assert stored.status is Status.QUEUED and stored.attempts == 0 and stored.size == 1024
    assert await store.get(new_id()) is None
    stats = await store.stats(now=NOW + 5)
    assert stats["hooks"].counts[Status.QUEUED] == 1
    assert stats["hooks"].bytes == 1024
    assert stats["hooks"].oldest_queued_age == 5.0


async def test_the_same_idempotency_key_on_a_route_is_stored_once_within_the_window(store: Store) -> None:
    first = await store.accept(message(key="order-7", body=b"first"), LIMITS)
    again = await store.accept(message(key="order-7", body=b"second", now=NOW + 10), LIMITS)
    assert again.duplicate and again.id == first.id
    assert (await store.get(first.id)).body == b"first"  # type: ignore[union-attr]

    other_route = await store.accept(message(route="audit", key="order-7"), LIMITS)
    assert not other_route.duplicate and other_route.id != first.id

    after_window = await store.accept(message(key="order-7", now=NOW + LIMITS.dedupe_window + 1), LIMITS)
    assert not after_window.duplicate and after_window.id != first.id

    # A generated key (dedupe=False) never matches anything.
    twice = [await store.accept(message(key="gen"), LIMITS, dedupe=False) for _ in range(2)]
    assert twice[0].id != twice[1].id
    stats = await store.stats(now=NOW)
    assert stats["hooks"].counts[Status.QUEUED] == 4 and stats["audit"].counts[Status.QUEUED] == 1


async def test_a_full_route_refuses_and_stores_nothing(store: Store) -> None:
    limits = Limits(max_pending=2, max_bytes=100, dedupe_window=60.0)
    for _ in range(2):
        await store.accept(message(body=b"x" * 10), limits)
    refused = message(body=b"x" * 10, key="late")
    with pytest.raises(QueueFull) as full:
        await store.accept(refused, limits)
    assert full.value.limit == "max_pending"
    assert await store.get(refused.id) is None

    with pytest.raises(QueueFull) as too_big:
        await store.accept(message(route="big", body=b"x" * 101), limits)
    assert too_big.value.limit == "max_bytes"

    # The refused key was not remembered: once there is room it is stored.
    [taken] = await claim(store, limit=1)
    assert await store.mark_delivered(taken, owner="a", now=NOW, attempts=1, status=200)
    assert not (await store.accept(refused, limits)).duplicate
    assert (await store.get(refused.id)) is not None
    stats = await store.stats(now=NOW)
    assert stats["hooks"].counts[Status.QUEUED] == 2 and stats["hooks"].bytes == 20
    assert "big" not in stats or sum(stats["big"].counts.values()) == 0


async def test_limits_written_with_units_in_the_config_are_enforced(store: Store) -> None:
    # The config's sizes are Size values whose str() is "1KiB": the store must use their number.
    config = parse_config(
        'upstreams: {up: {endpoints: ["http://127.0.0.1:1"]}}\n'
        "routes: [{name: hooks, match: {path_prefix: /}, upstream: up,\n"
        "          delivery: {max_bytes: 1KiB, max_pending: 3, dedupe_window: 1m}}]\n", {},
    )
    delivery = config.routes[0].delivery
    assert delivery is not None
    limits = Limits.of(delivery)
    assert str(limits.max_bytes) == "1KiB"
    await store.accept(message(body=b"x" * 600), limits)
    with pytest.raises(QueueFull) as too_big:
        await store.accept(message(body=b"x" * 600), limits)
    assert too_big.value.limit == "max_bytes"
    for _ in range(2):
        await store.accept(message(body=b"x"), limits, dedupe=False)
    with pytest.raises(QueueFull) as too_many:
        await store.accept(message(body=b"x"), limits, dedupe=False)
    assert too_many.value.limit == "max_pending"


async def test_concurrent_accepts_past_the_limit_store_exactly_the_limit(store: Store) -> None:
    limits = Limits(max_pending=5, max_bytes=1 << 20, dedupe_window=60.0)
    results = await asyncio.gather(
        *(store.accept(message(target=f"/{n}"), limits, dedupe=False) for n in range(12)), return_exceptions=True
    )
    assert sum(isinstance(result, QueueFull) for result in results) == 7
    stored = [result for result in results if not isinstance(result, BaseException)]
    assert len(stored) == 5
    for accepted in stored:
        assert await store.get(accepted.id) is not None  # type: ignore[union-attr]
    assert (await store.stats(now=NOW))["hooks"].counts[Status.QUEUED] == 5


async def test_a_claim_leases_messages_to_one_owner(store: Store) -> None:
    ids = await accept_all(store, 3)
    assert await claim(store, owner="a", limit=2) == ids[:2]
    claimed = await store.get(ids[0])
    assert claimed is not None and claimed.status is Status.DELIVERING and claimed.lease_owner == "a"
    # Within the lease nobody else gets them; the third is still there.
    assert await claim(store, owner="b", now=NOW + 1, limit=10) == [ids[2]]
    assert await claim(store, owner="c", now=NOW + 2, limit=10) == []
    stats = await store.stats(now=NOW)
    assert stats["hooks"].counts[Status.DELIVERING] == 3 and stats["hooks"].counts[Status.QUEUED] == 0


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_an_expired_lease_hands_the_message_to_another_owner(store: Store, ordered: bool) -> None:
    """A worker that died holding a message: once its lease passes, a live one takes it over.

    Every worker of a route claims with the same lease (Redis measures it as the entry's idle time).
    """
    [message_id] = await accept_all(store, 1, now=time.time())
    assert await claim(store, owner="dead-worker", now=time.time(), lease=0.3, ordered=ordered) == [message_id]
    taken: list[str] = []
    deadline = time.monotonic() + 10
    while not taken and time.monotonic() < deadline:
        taken = await claim(store, owner="live-worker", now=time.time(), lease=0.3, ordered=ordered)
        await asyncio.sleep(0.05)
    assert taken == [message_id]
    record = await store.get(message_id)
    assert record is not None and record.lease_owner == "live-worker" and record.status is Status.DELIVERING
    # The dead worker's late answer does not count; the live worker's does.
    assert not await store.mark_delivered(message_id, owner="dead-worker", now=NOW, attempts=1, status=200)
    assert await store.mark_delivered(message_id, owner="live-worker", now=NOW, attempts=1, status=200)
    assert (await store.get(message_id)).status is Status.DELIVERED  # type: ignore[union-attr]


async def test_ordered_claims_keep_the_line_behind_a_waiting_message(store: Store) -> None:
    first, second, third = await accept_all(store, 3)
    assert await claim(store, owner="a", ordered=True, limit=1) == [first]
    assert await claim(store, owner="b", ordered=True, limit=1) == []  # the head is in flight
    assert await store.reschedule(first, owner="a", now=NOW, attempts=1, next_attempt_at=NOW + 10,
                                  error="connect_failure", status=None)
    # Waiting for its retry, the head holds back the others.
    assert await claim(store, owner="b", now=NOW + 5, ordered=True, limit=1) == []
    assert await claim(store, owner="b", now=NOW + 10, ordered=True, limit=1) == [first]
    retried = await store.get(first)
    assert retried is not None and retried.attempts == 1 and retried.last_error == "connect_failure"
    assert await store.mark_delivered(first, owner="b", now=NOW + 11, attempts=2, status=204)
    assert await claim(store, owner="b", now=NOW + 11, ordered=True, limit=1) == [second]
    # A dead head leaves the line.
    assert await store.mark_dead(second, owner="b", now=NOW + 12, attempts=1, reason="rejected", error=None,
                                 status=400)
    assert await claim(store, owner="b", now=NOW + 12, ordered=True, limit=1) == [third]


async def test_an_ordered_claim_hands_out_the_line_up_to_the_first_message_not_free(store: Store) -> None:
    first, second, third, fourth = await accept_all(store, 4)
    assert await claim(store, owner="a", ordered=True, limit=2) == [first, second]
    assert await claim(store, owner="b", ordered=True) == []  # the head is held
    assert await store.mark_delivered(first, owner="a", now=NOW, attempts=1, status=200)
    assert await store.reschedule(second, owner="a", now=NOW, attempts=1, next_attempt_at=NOW + 10,
                                  error="timeout", status=None)
    assert await claim(store, owner="b", now=NOW + 1, ordered=True) == []  # the new head waits
    assert await claim(store, owner="b", now=NOW + 10, ordered=True) == [second, third, fourth]
    # Given back (the head must wait again), the rest keeps its place behind it.
    assert await store.release(fourth, owner="b", now=NOW + 10)
    assert await store.release(third, owner="b", now=NOW + 10)
    assert await store.mark_dead(second, owner="b", now=NOW + 10, attempts=2, reason="rejected", error=None,
                                 status=404)
    assert await claim(store, owner="c", now=NOW + 11, ordered=True) == [third, fourth]


async def test_unordered_claims_pass_a_waiting_message(store: Store) -> None:
    first, second, third = await accept_all(store, 3)
    assert await claim(store, limit=1) == [first]
    assert await store.reschedule(first, owner="a", now=NOW, attempts=1, next_attempt_at=NOW + 10,
                                  error=None, status=503)
    assert sorted(await claim(store, now=NOW + 1, limit=10)) == sorted([second, third])
    assert await claim(store, now=NOW + 10, limit=10) == [first]
    retried = await store.get(first)
    assert retried is not None and retried.last_status == 503 and retried.last_error is None


async def test_release_gives_a_message_back_untouched(store: Store) -> None:
    [message_id] = await accept_all(store, 1)
    assert await claim(store, ordered=True) == [message_id]
    assert await store.release(message_id, owner="a", now=NOW + 1)
    released = await store.get(message_id)
    assert released is not None and released.status is Status.QUEUED and released.attempts == 0
    assert released.lease_owner is None
    assert await claim(store, owner="b", now=NOW + 1) == [message_id]


async def test_dead_letters_retry_redrive_and_delete(store: Store) -> None:
    first, second, third = await accept_all(store, 3)
    for message_id in await claim(store, limit=3):
        assert await store.mark_dead(message_id, owner="a", now=NOW + 1, attempts=20, reason="max_attempts",
                                     error="timeout", status=None)
    dead = await store.get(first)
    assert dead is not None and dead.status is Status.DEAD and dead.dead_reason == "max_attempts"
    assert dead.attempts == 20 and dead.last_error == "timeout" and dead.body == b"payload"
    assert await claim(store, now=NOW + 100) == []
    stats = await store.stats(now=NOW)
    assert stats["hooks"].counts[Status.DEAD] == 3 and stats["hooks"].bytes == 3 * len(b"payload")

    # retry: one message, fresh attempts and ttl, at the back of the line.
    later = (await store.accept(message(target="/later"), LIMITS, dedupe=False)).id
    assert await store.retry(first, now=NOW + 50)
    again = await store.get(first)
    assert again is not None and again.status is Status.QUEUED and again.attempts == 0
    assert again.queued_at == NOW + 50 and again.dead_reason is None
    assert await claim(store, owner="b", now=NOW + 50, ordered=True, limit=1) == [later]

    # redrive: every dead one of the route.
    assert await store.redrive("hooks", now=NOW + 60) == 2
    assert await store.redrive("hooks", now=NOW + 60) == 0
    assert {(await store.get(i)).status for i in (second, third)} == {Status.QUEUED}  # type: ignore[union-attr]

    # retry of a waiting message makes it due now; of an in-flight or unknown one: no.
    assert await store.retry(second, now=NOW + 61)
    assert not await store.retry(later, now=NOW + 61)  # delivering (claimed by b)
    assert not await store.retry(new_id(), now=NOW + 61)

    assert await store.delete(third)
    assert await store.get(third) is None
    assert not await store.delete(third)
    assert await store.delete(later)  # in flight: its worker's answer will not apply
    assert not await store.mark_delivered(later, owner="b", now=NOW + 62, attempts=1, status=200)
    stats = await store.stats(now=NOW + 62)
    assert stats["hooks"].counts == {Status.QUEUED: 2, Status.DELIVERING: 0, Status.DELIVERED: 0, Status.DEAD: 0}
    assert stats["hooks"].bytes == 2 * len(b"payload")


async def test_delivered_records_lose_their_body_and_are_purged_after_retention(store: Store) -> None:
    ids = await accept_all(store, 3)
    for number, message_id in enumerate(await claim(store, limit=3, ordered=False)):
        assert await store.mark_delivered(message_id, owner="a", now=NOW + number, attempts=1, status=200)
    delivered = await store.get(ids[0])
    assert delivered is not None and delivered.status is Status.DELIVERED
    assert delivered.body == b"" and delivered.size == len(b"payload") and delivered.last_status == 200
    stats = await store.stats(now=NOW)
    assert stats["hooks"].counts[Status.DELIVERED] == 3 and stats["hooks"].bytes == 0
    assert stats["hooks"].oldest_queued_age == 0.0

    assert await store.purge("hooks", before=NOW + 2) == 2  # updated at NOW and NOW + 1
    assert await store.purge("hooks", before=NOW + 2) == 0
    remaining = [found.id for found in (await store.list(route="hooks")).messages]
    assert len(remaining) == 1
    assert (await store.stats(now=NOW))["hooks"].counts[Status.DELIVERED] == 1


async def test_list_pages_through_messages_in_id_order_without_bodies(store: Store) -> None:
    ids = await accept_all(store, 25)
    ids += await accept_all(store, 3, route="audit")
    for message_id in await claim(store, limit=4):
        assert await store.mark_dead(message_id, owner="a", now=NOW, attempts=1, reason="rejected", error=None,
                                     status=422)

    seen: list[str] = []
    after = None
    for _ in range(10):
        page = await store.list(route="hooks", limit=10, after=after)
        assert all(found.body == b"" and found.size == len(b"payload") for found in page.messages)
        seen += [found.id for found in page.messages]
        after = page.after
        if after is None:
            break
    assert seen == sorted(ids[:25])

    everything = await store.list(limit=100)
    assert [found.id for found in everything.messages] == sorted(ids) and everything.after is None
    dead = await store.list(route="hooks", status=Status.DEAD, limit=3)
    assert len(dead.messages) == 3 and dead.after is not None
    rest = await store.list(route="hooks", status=Status.DEAD, limit=3, after=dead.after)
    assert len(rest.messages) == 1 and rest.after is None
    assert {found.status for found in dead.messages + rest.messages} == {Status.DEAD}
    assert (await store.list(route="nothing-here")).messages == []


async def test_a_reopened_store_has_everything(backend: Backend) -> None:
    first = await backend.open()
    ids = await accept_all(first, 5)
    [head] = await claim(first, limit=1, ordered=True)
    await first.close()
    second = await backend.open()
    try:
        assert [found.id for found in (await second.list(limit=10)).messages] == sorted(ids)
        assert (await second.get(head)).status is Status.DELIVERING  # type: ignore[union-attr]
        assert await second.mark_delivered(head, owner="a", now=NOW, attempts=1, status=200)
    finally:
        await second.close()


# -- SQLite only ------------------------------------------------------------------------------


async def test_sqlite_concurrent_accepts_share_commits(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "delivery.sqlite3")
    try:
        before = store.commits
        results = await asyncio.gather(
            *(store.accept(message(target=f"/{n}"), LIMITS, dedupe=False) for n in range(200))
        )
        assert len({accepted.id for accepted in results}) == 200
        assert 1 <= store.commits - before < 200
        assert (await store.stats(now=NOW))["hooks"].counts[Status.QUEUED] == 200
    finally:
        await store.close()


def _accepter(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.delivery_accepter", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )


def _read_ids(process: subprocess.Popen[str], at_least: int, limit: float = 30.0) -> list[str]:
    """Lines from the accepter until `at_least` ids came (bounded)."""
    assert process.stdout is not None
    ids: list[str] = []
    deadline = time.monotonic() + limit
    while len(ids) < at_least and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        ids.append(line.strip())
    return ids


def _rest_of_ids(process: subprocess.Popen[str]) -> list[str]:
    """Complete lines printed before the process died (a torn last line is not an id)."""
    assert process.stdout is not None
    return [line.strip() for line in process.stdout.read().splitlines(keepends=True) if line.endswith("\n")]


async def test_sqlite_every_acknowledged_accept_survives_a_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "delivery.sqlite3"
    process = _accepter("sqlite", str(path))
    try:
        ids = _read_ids(process, 500)
        assert len(ids) == 500, "the accepter did not get going"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        ids += _rest_of_ids(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    store = await SqliteStore.open(path)
    try:
        missing = [message_id for message_id in ids if await store.get(message_id) is None]
        assert missing == []
        stats = await store.stats(now=time.time())
        assert stats["burst"].counts[Status.QUEUED] >= len(ids)
    finally:
        await store.close()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database at all\n" * 100)


def _foreign(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.commit()


def _torn(path: Path) -> None:
    """A real store file whose pages after the header were overwritten."""
    asyncio.run(_make_store(path))
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)
    path.write_bytes(bytes(data))


def _newer(path: Path) -> None:
    asyncio.run(_make_store(path))
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA user_version = 99")
        connection.commit()


async def _make_store(path: Path) -> None:
    store = await SqliteStore.open(path)
    await store.accept(message(), LIMITS)
    await store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("spoil", "says"),
    [(_garbage, "not an SQLite database"), (_foreign, "another program"), (_torn, "corrupt"), (_newer, "newer")],
    ids=["garbage", "foreign", "torn", "newer"],
)
def test_sqlite_a_file_it_cannot_use_is_a_clear_error_and_stays_untouched(
    tmp_path: Path, spoil: Callable[[Path], None], says: str
) -> None:
    path = tmp_path / "delivery.sqlite3"
    spoil(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as error:
        asyncio.run(SqliteStore.open(path))
    assert str(path) in str(error.value) and says in str(error.value)
    assert path.read_bytes() == before


def test_sqlite_a_state_directory_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = blocker / "state"  # under a regular file: not even root can create it
    with pytest.raises(StoreError) as error:
        asyncio.run(open_store("sqlite", state))
    assert f"state directory {state} cannot be written" in str(error.value)
    if os.geteuid() != 0:  # permission bits bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StoreError, match="cannot be written"):
            asyncio.run(open_store("sqlite", locked))


@pytest.fixture
def read_only_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory bind-mounted read-only onto itself: read-only for root too (skipped where mount is denied)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    bound = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True, check=False)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {done.stderr.decode().strip()}")
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_sqlite_a_read_only_state_directory_is_a_clear_error_at_start(read_only_directory: Path) -> None:
    with pytest.raises(StoreError) as error:
        asyncio.run(open_store("sqlite", read_only_directory))
    assert f"state directory {read_only_directory} cannot be written (Read-only file system)" in str(error.value)
    assert list(read_only_directory.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a disk that really fills up (needs root, as in CI; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_sqlite_a_full_disk_is_store_unavailable_never_an_accept(small_filesystem: Path) -> None:
    store = await SqliteStore.open(small_filesystem / "delivery.sqlite3")
    try:
        stored: list[str] = []
        limits = Limits(max_pending=10**6, max_bytes=1 << 40, dedupe_window=60.0)
        with pytest.raises(StoreUnavailable) as error:
            for number in range(1000):  # 1000 x 4 KiB cannot fit in 512 KiB
                stored.append((await store.accept(message(body=os.urandom(4096), target=f"/{number}"), limits)).id)
        assert "full" in str(error.value)
        assert 10 < len(stored) < 1000
        # What was acknowledged is all there and the store still answers.
        for message_id in stored:
            assert await store.get(message_id) is not None
        assert (await store.stats(now=NOW))["hooks"].counts[Status.QUEUED] == len(stored)
    finally:
        await store.close()


# -- Redis only -------------------------------------------------------------------------------


@needs_redis
async def test_redis_that_cannot_be_reached_is_a_clear_error_naming_it_without_password() -> None:
    from tests.processes import free_port

    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreError) as error:
        await open_store(url, Path("/nonexistent"))
    assert "cannot be reached" in str(error.value) and "secret" not in str(error.value)
    assert "127.0.0.1" in str(error.value)


@needs_redis
async def test_redis_gone_at_accept_is_store_unavailable(tmp_path: Path) -> None:
    from sidecar.delivery.redis_store import RedisStore

    server = RedisServer(tmp_path).start()
    store = await RedisStore.open(server.url)
    try:
        await store.accept(message(), LIMITS)
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.accept(message(key="after"), LIMITS)
    finally:
        await store.close()
        server.stop()


@needs_redis
async def test_redis_with_appendfsync_always_keeps_every_acknowledged_accept_through_a_kill_9(tmp_path: Path) -> None:
    from sidecar.delivery.redis_store import RedisStore

    server = RedisServer(tmp_path, ("--appendonly", "yes", "--appendfsync", "always")).start()
    process = _accepter("redis", server.url, "burst:")
    try:
        ids = _read_ids(process, 500)
        assert len(ids) == 500, "the accepter did not get going"
        server.kill()  # the server dies mid-burst; the accepter's tasks stop at their first error
        process.wait(timeout=30)
        ids += _rest_of_ids(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    server.start()  # same port, same directory: it replays its append-only file
    store = await RedisStore.open(server.url, prefix="burst:")
    try:
        missing = [message_id for message_id in ids if await store.get(message_id) is None]
        assert missing == []
    finally:
        await store.close()
        server.stop()
