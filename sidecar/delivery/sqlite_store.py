"""The default store: one SQLite file under the state directory, written by one thread.

Durability: WAL with synchronous=FULL, so a commit is on disk (the WAL fsynced) when it returns,
and `accept` returns only after the commit that holds its message.

Group commit: every call becomes a job for the writer thread. The thread takes every job that is
waiting, runs them in one transaction (each in a savepoint, so one refused accept does not undo
the others) and commits once: while one batch is being fsynced the next one gathers. Under load
many accepts share one fsync; alone, a call pays one commit and no timer.

Several processes (`--workers N`) may open the same file: SQLite's locks serialize their
transactions (busy_timeout), and leases keep two workers off one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sidecar.delivery.model import PENDING, Headers, Message, Status
from sidecar.delivery.store import Accepted, Limits, Page, QueueFull, RouteStats, StoreError, StoreUnavailable

T = TypeVar("T")

# "sdlv" in the file header: tells our file from any other SQLite database.
APPLICATION_ID = int.from_bytes(b"sdlv", "big")
SCHEMA_VERSION = 1
MAX_BATCH = 1024  # jobs per transaction: bounds the time one commit holds the lock
BUSY_TIMEOUT_MS = 5000  # another process (a --workers sibling) holding the write lock

# MIGRATIONS[v] takes a file from schema version v to v + 1. Append, never edit.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY,  -- the line: order of (re)entering the queue
            id TEXT NOT NULL UNIQUE,
            route TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            headers TEXT NOT NULL,  -- JSON list of [name, value]
            body BLOB NOT NULL,
            size INTEGER NOT NULL,
            idempotency_key TEXT NOT NULL,
            accepted_at REAL NOT NULL,
            queued_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            last_status INTEGER,
            dead_reason TEXT,
            lease_owner TEXT,
            lease_expires_at REAL
        )""",
        "CREATE INDEX messages_list ON messages (route, status, id)",
        # Partial indexes: each covers only the rows one query looks for.
        "CREATE INDEX messages_line ON messages (route, seq) WHERE status IN ('queued', 'delivering')",
        "CREATE INDEX messages_due ON messages (route, next_attempt_at) WHERE status = 'queued'",
        "CREATE INDEX messages_leases ON messages (route, lease_expires_at) WHERE status = 'delivering'",
        "CREATE INDEX messages_done ON messages (route, updated_at) WHERE status = 'delivered'",
        # Counts and bytes per route and status, kept with every change so limits and stats stay O(1).
        """CREATE TABLE totals (
            route TEXT NOT NULL, status TEXT NOT NULL, count INTEGER NOT NULL, bytes INTEGER NOT NULL,
            PRIMARY KEY (route, status)
        ) WITHOUT ROWID""",
        """CREATE TABLE dedupe (
            route TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL, expires_at REAL NOT NULL,
            PRIMARY KEY (route, key)
        ) WITHOUT ROWID""",
    ],
]

_COLUMNS = (
    "id, route, method, target, headers, body, size, idempotency_key, accepted_at, queued_at, updated_at, "
    "status, attempts, next_attempt_at, last_error, last_status, dead_reason, lease_owner, lease_expires_at"
)
_COLUMNS_NO_BODY = _COLUMNS.replace("body,", "x'' AS body,")
_IN_LINE = "status IN ('queued', 'delivering')"


def _message(row: Sequence[Any]) -> Message:
    return Message(
        id=row[0], route=row[1], method=row[2], target=row[3],
        headers=tuple((name, value) for name, value in json.loads(row[4])), body=bytes(row[5]), size=row[6],
        idempotency_key=row[7], accepted_at=row[8], queued_at=row[9], updated_at=row[10], status=Status(row[11]),
        attempts=row[12], next_attempt_at=row[13], last_error=row[14], last_status=row[15], dead_reason=row[16],
        lease_owner=row[17], lease_expires_at=row[18],
    )


def _encode_headers(headers: Headers) -> str:
    return json.dumps([list(pair) for pair in headers], separators=(",", ":"))


@dataclass
class _Job:
    op: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    writes: bool


class SqliteStore:
    def __init__(self, path: Path, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.commits = 0  # transactions that wrote: fewer than accepts under concurrency (group commit)
        self._connection = connection
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"delivery-store {path.name}", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open or create the store file; StoreError naming the file or directory when it cannot be used."""
        connection = await asyncio.to_thread(_open_database, path)
        return cls(path, connection, asyncio.get_running_loop())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the writer thread -------------------------------------------------------------------

    def _submit(self, op: Callable[[sqlite3.Connection], T], writes: bool = True) -> asyncio.Future[T]:
        if self._closed:
            raise StoreUnavailable(f"delivery store {self.path} is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put(_Job(op, future, writes))
        return future

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            results = self._run_batch(batch)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self._loop.call_soon_threadsafe(_settle, batch, results)
        self._connection.close()

    def _run_batch(self, batch: list[_Job]) -> list[tuple[bool, Any]]:
        """Run the jobs in one transaction; (ok, result or exception) per job, settled after the commit.

        A job that hits an SQLite error (disk full, I/O error) spoils the transaction: it is rolled
        back, that job fails with StoreUnavailable and the batch runs again without it.
        """
        results: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        pending = list(range(len(batch)))
        writes = any(job.writes for job in batch)
        connection = self._connection
        while pending:
            done: dict[int, tuple[bool, Any]] = {}
            broken: tuple[int, sqlite3.Error] | None = None
            try:
                connection.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
                for index in pending:
                    connection.execute("SAVEPOINT job")
                    try:
                        done[index] = (True, batch[index].op(connection))
                    except sqlite3.Error as exc:
                        broken = (index, exc)
                        break
                    except Exception as exc:  # noqa: BLE001 - a refusal (QueueFull) or a bug: the caller gets it
                        connection.execute("ROLLBACK TO job")
                        done[index] = (False, exc)
                    connection.execute("RELEASE job")
                if broken is None:
                    connection.execute("COMMIT")
            except sqlite3.Error as exc:  # BEGIN or COMMIT failed: nothing of this batch is stored
                _rollback(connection)
                for index in pending:
                    results[index] = (False, self._unavailable(exc))
                return results
            if broken is not None:
                _rollback(connection)
                failed, error = broken
                results[failed] = (False, self._unavailable(error))
                pending.remove(failed)
                continue
            if writes:
                self.commits += 1
            for index, result in done.items():
                results[index] = result
            return results
        return results

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"delivery store {self.path} cannot be written: {exc}")

    # -- the Store interface -----------------------------------------------------------------

    async def accept(self, message: Message, limits: Limits, *, dedupe: bool = True) -> Accepted:
        def op(db: sqlite3.Connection) -> Accepted:
            if dedupe:
                row = db.execute(
                    "SELECT id FROM dedupe WHERE route = ? AND key = ? AND expires_at > ?",
                    (message.route, message.idempotency_key, message.accepted_at),
                ).fetchone()
                if row is not None:
                    return Accepted(row[0], duplicate=True)
            count, size = db.execute(
                "SELECT coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM totals"
                " WHERE route = ? AND status IN ('queued', 'delivering', 'dead')", (message.route,),
            ).fetchone()
            if count + 1 > limits.max_pending:
                raise QueueFull(message.route, "max_pending")
            if size + message.size > limits.max_bytes:
                raise QueueFull(message.route, "max_bytes")
            db.execute(
                f"INSERT INTO messages ({_COLUMNS}) VALUES ({', '.join('?' * 19)})",
                (
                    message.id, message.route, message.method, message.target, _encode_headers(message.headers),
                    message.body, message.size, message.idempotency_key, message.accepted_at, message.queued_at,
                    message.updated_at, Status.QUEUED, 0, message.next_attempt_at, None, None, None, None, None,
                ),
            )
            _count(db, message.route, Status.QUEUED, 1, message.size)
            if dedupe:
                db.execute(
                    "INSERT OR REPLACE INTO dedupe (route, key, id, expires_at) VALUES (?, ?, ?, ?)",
                    (message.route, message.idempotency_key, message.id, message.accepted_at + limits.dedupe_window),
                )
            return Accepted(message.id, duplicate=False)

        return await self._submit(op)

    async def claim_due(
        self, route: str, *, owner: str, now: float, lease: float, limit: int, ordered: bool
    ) -> list[Message]:
        def op(db: sqlite3.Connection) -> list[Message]:
            if ordered:
                line = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE route = ? AND {_IN_LINE} ORDER BY seq LIMIT ?",
                    (route, limit),
                ).fetchall()
                rows = list(itertools.takewhile(lambda row: _claimable(_message(row), now), line))
            else:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE route = ? AND status = 'delivering'"
                    " AND lease_expires_at <= ? ORDER BY lease_expires_at LIMIT ?", (route, now, limit),
                ).fetchall()
                rows += db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE route = ? AND status = 'queued'"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?", (route, now, limit - len(rows)),
                ).fetchall()
            claimed = []
            for row in rows:
                message = _message(row)
                db.execute(
                    "UPDATE messages SET status = 'delivering', lease_owner = ?, lease_expires_at = ?, updated_at = ?"
                    " WHERE id = ?", (owner, now + lease, now, message.id),
                )
                if message.status is Status.QUEUED:
                    _move(db, route, Status.QUEUED, Status.DELIVERING, message.size)
                claimed.append(_claimed(message, owner, now, lease))
            return claimed

        return await self._submit(op)

    async def mark_delivered(self, message_id: str, *, owner: str, now: float, attempts: int, status: int) -> bool:
        return await self._finish(
            message_id, owner, Status.DELIVERED,
            "body = x'', attempts = ?, last_status = ?, last_error = NULL, updated_at = ?", (attempts, status, now),
        )

    async def reschedule(
        self, message_id: str, *, owner: str, now: float, attempts: int, next_attempt_at: float,
        error: str | None, status: int | None,
    ) -> bool:
        return await self._finish(
            message_id, owner, Status.QUEUED,
            "attempts = ?, next_attempt_at = ?, last_error = ?, last_status = ?, updated_at = ?",
            (attempts, next_attempt_at, error, status, now),
        )

    async def mark_dead(
        self, message_id: str, *, owner: str, now: float, attempts: int, reason: str,
        error: str | None, status: int | None,
    ) -> bool:
        return await self._finish(
            message_id, owner, Status.DEAD,
            "attempts = ?, dead_reason = ?, last_error = ?, last_status = ?, updated_at = ?",
            (attempts, reason, error, status, now),
        )

    async def release(self, message_id: str, *, owner: str, now: float) -> bool:
        return await self._finish(message_id, owner, Status.QUEUED, "updated_at = ?", (now,))

    async def _finish(
        self, message_id: str, owner: str, status: Status, assignments: str, values: tuple[Any, ...]
    ) -> bool:
        """Move a message out of DELIVERING, only for the owner of its lease."""

        def op(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT route, size FROM messages WHERE id = ? AND status = 'delivering' AND lease_owner = ?",
                (message_id, owner),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                f"UPDATE messages SET status = ?, lease_owner = NULL, lease_expires_at = NULL, {assignments}"
                " WHERE id = ?", (status, *values, message_id),
            )
            _move(db, row[0], Status.DELIVERING, status, row[1])
            return True

        return await self._submit(op)

    async def get(self, message_id: str) -> Message | None:
        def op(db: sqlite3.Connection) -> Message | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
            return None if row is None else _message(row)

        return await self._submit(op, writes=False)

    async def list(
        self, route: str | None = None, status: Status | None = None, limit: int = 100, after: str | None = None
    ) -> Page:
        conditions, values = ["id > ?"], [after or ""]
        if status is not None:
            conditions += ["route = ?", "status = ?"] if route is not None else ["status = ?"]
            values += [route, status] if route is not None else [status]
        elif route is not None:
            # "+route": walk the id index and stop at `limit` matches, rather than sorting every record
            # of the route (delivered ones included) by id.
            conditions.append("+route = ?")
            values.append(route)
        query = f"SELECT {_COLUMNS_NO_BODY} FROM messages WHERE {' AND '.join(conditions)} ORDER BY id LIMIT ?"

        def op(db: sqlite3.Connection) -> Page:
            rows = db.execute(query, (*values, limit + 1)).fetchall()
            messages = [_message(row) for row in rows[:limit]]
            return Page(messages, messages[-1].id if len(rows) > limit else None)

        return await self._submit(op, writes=False)

    async def retry(self, message_id: str, *, now: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT route, status, size FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return False
            if row[1] == Status.QUEUED:
                db.execute("UPDATE messages SET next_attempt_at = ?, updated_at = ? WHERE id = ?",
                           (now, now, message_id))
                return True
            if row[1] != Status.DEAD:
                return False
            _requeue(db, message_id, now)
            _move(db, row[0], Status.DEAD, Status.QUEUED, row[2])
            return True

        return await self._submit(op)

    async def redrive(self, route: str, *, now: float) -> int:
        def op(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, size FROM messages WHERE route = ? AND status = 'dead' ORDER BY seq", (route,)
            ).fetchall()
            for message_id, size in rows:
                _requeue(db, message_id, now)
                _move(db, route, Status.DEAD, Status.QUEUED, size)
            return len(rows)

        return await self._submit(op)

    async def delete(self, message_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT route, status, size FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            status = Status(row[1])
            _count(db, row[0], status, -1, -row[2] if status in PENDING else 0)
            return True

        return await self._submit(op)

    async def stats(self, *, now: float) -> dict[str, RouteStats]:
        def op(db: sqlite3.Connection) -> dict[str, RouteStats]:
            counts: dict[str, dict[Status, int]] = {}
            sizes: dict[str, int] = {}
            for route, status, count, size in db.execute("SELECT route, status, count, bytes FROM totals"):
                counts.setdefault(route, dict.fromkeys(Status, 0))[Status(status)] = count
                sizes[route] = sizes.get(route, 0) + size
            stats = {}
            for route, route_counts in counts.items():
                # The head of the line is the message that entered the queue first.
                head = db.execute(
                    f"SELECT queued_at FROM messages WHERE route = ? AND {_IN_LINE} ORDER BY seq LIMIT 1", (route,)
                ).fetchone()
                age = 0.0 if head is None else max(0.0, now - head[0])
                stats[route] = RouteStats(route_counts, sizes[route], age)
            return stats

        return await self._submit(op, writes=False)

    async def purge(self, route: str, *, before: float) -> int:
        def op(db: sqlite3.Connection) -> int:
            removed = db.execute(
                "DELETE FROM messages WHERE route = ? AND status = 'delivered' AND updated_at < ?", (route, before)
            ).rowcount
            _count(db, route, Status.DELIVERED, -removed, 0)
            db.execute("DELETE FROM dedupe WHERE route = ? AND expires_at < ?", (route, before))
            return removed

        return await self._submit(op)


def _claimable(message: Message, now: float) -> bool:
    if message.status is Status.QUEUED:
        return message.next_attempt_at <= now
    return message.lease_expires_at is not None and message.lease_expires_at <= now


def _claimed(message: Message, owner: str, now: float, lease: float) -> Message:
    return replace(
        message, status=Status.DELIVERING, lease_owner=owner, lease_expires_at=now + lease, updated_at=now
    )


def _requeue(db: sqlite3.Connection, message_id: str, now: float) -> None:
    """Back of the line, with fresh attempts and ttl."""
    db.execute(
        "UPDATE messages SET seq = (SELECT max(seq) + 1 FROM messages), status = 'queued', attempts = 0,"
        " queued_at = ?, next_attempt_at = ?, updated_at = ?, dead_reason = NULL WHERE id = ?",
        (now, now, now, message_id),
    )


def _count(db: sqlite3.Connection, route: str, status: Status, count: int, size: int) -> None:
    db.execute(
        "INSERT INTO totals (route, status, count, bytes) VALUES (?, ?, ?, ?) ON CONFLICT (route, status)"
        " DO UPDATE SET count = count + excluded.count, bytes = bytes + excluded.bytes",
        (route, status, count, size),
    )


def _move(db: sqlite3.Connection, route: str, old: Status, new: Status, size: int) -> None:
    """Keep the totals right when a message changes status; delivered messages hold no body."""
    _count(db, route, old, -1, -size if old in PENDING else 0)
    _count(db, route, new, 1, size if new in PENDING else 0)


def _settle(batch: list[_Job], results: list[tuple[bool, Any]]) -> None:
    for job, (ok, value) in zip(batch, results, strict=True):
        if job.future.done():  # the caller was cancelled; the job's effect stands
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _rollback(connection: sqlite3.Connection) -> None:
    # SQLite may have rolled back by itself (e.g. after SQLITE_FULL): then there is nothing to undo.
    with contextlib.suppress(sqlite3.Error):
        if connection.in_transaction:
            connection.execute("ROLLBACK")


def _open_database(path: Path) -> sqlite3.Connection:
    """Open, check and upgrade the file; StoreError with the file's name for anything that is wrong."""
    _check_directory(path.parent)
    if path.is_dir():
        raise StoreError(f"delivery store {path} is a directory, not a file")
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as file:
            header = file.read(16)
        if header != b"SQLite format 3\x00":
            raise StoreError(
                f"delivery store {path} is not an SQLite database (corrupt or foreign): move it away or use"
                " another state directory; it was not changed"
            )
    try:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"delivery store {path} cannot be opened: {exc}") from None
    try:
        _prepare(connection, path)
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise StoreError(
            f"delivery store {path} is corrupt or not a delivery store ({exc}): move it away or use another"
            " state directory; it was not changed"
        ) from None
    except StoreError:
        connection.close()
        raise
    return connection


def _check_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Permission bits say nothing for root and nothing about read-only mounts: write a file.
        with tempfile.TemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        raise StoreError(
            f"state directory {directory} cannot be written ({exc.strerror or exc}): the delivery queue"
            " lives there; give it a writable directory (--state-dir or SIDECAR_STATE_DIR)"
        ) from None


def _prepare(connection: sqlite3.Connection, path: Path) -> None:
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != APPLICATION_ID and (application_id != 0 or tables):
        raise StoreError(
            f"delivery store {path} is an SQLite database of another program (application_id {application_id}):"
            " move it away or use another state directory; it was not changed"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"delivery store {path} has schema version {version}, written by a newer sidecar; this one"
            f" knows up to {SCHEMA_VERSION}"
        )
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"delivery store {path}: the file system does not support SQLite's WAL mode ({mode})")
    connection.execute("PRAGMA synchronous = FULL")
    if version < SCHEMA_VERSION:
        connection.execute("BEGIN IMMEDIATE")
        # Another process (a --workers sibling) may have upgraded the file while we waited for the lock.
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                connection.execute(statement)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    # Read every table once: a file damaged past its header fails here, at start, not at the first 202.
    for table in ("messages", "totals", "dedupe"):
        connection.execute(f"SELECT * FROM {table} LIMIT 1").fetchall()
