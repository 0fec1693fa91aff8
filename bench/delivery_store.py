"""Accepted messages per second of a delivery store, with concurrent accepters (the store alone, no HTTP).

    python bench/delivery_store.py                          # SQLite (synchronous=FULL), 64 accepters, 1 KiB
    python bench/delivery_store.py --messages 50000 --concurrency 128
    python bench/delivery_store.py --store redis://127.0.0.1:6379/0
    python bench/delivery_store.py --dir /var/lib/sidecar   # measure the disk the state directory lives on
    python bench/delivery_store.py --deliver 1              # then deliver them all, concurrency 1, no HTTP

Each accepter awaits `accept` (durable on return) and then takes the next message, as the request
handlers of 64 concurrent callers would. Prints accepts/s, CPU time per accept (steadier than
accepts/s on a shared machine) and, for SQLite, the commits it took (group
commit: many accepts per fsync). With --deliver N, a Deliverer then drains the queue with
concurrency N and a send that answers 200 at once: the store's share of each delivery (claims and
records, which share commits). Run it from the repository root. Bounded: --messages in total and
--limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.config.delivery import RouteDelivery
from sidecar.delivery.deliverer import Deliverer
from sidecar.delivery.model import Decision, Message, Outcome, Schedule, Status, new_message
from sidecar.delivery.store import Limits, Store

LIMITS = Limits(max_pending=10**9, max_bytes=2**62, dedupe_window=86400.0)


def cpu_seconds() -> float:
    """This process's user + system time, every thread (the SQLite writer thread included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(store: Store, messages: int, concurrency: int, body_size: int, limit: float) -> tuple[int, float]:
    body = os.urandom(body_size)
    numbers = iter(range(messages))
    deadline = time.monotonic() + limit
    done = 0

    async def accepter() -> None:
        nonlocal done
        for number in numbers:
            if time.monotonic() > deadline:
                return
            message = new_message(
                route="bench", method="POST", target=f"/hooks/{number}",
                headers=(("content-type", "application/json"), ("idempotency-key", f"k{number}")),
                body=body, idempotency_key=f"k{number}", now=time.time(),
            )
            await store.accept(message, LIMITS)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(accepter() for _ in range(concurrency)))
    return done, time.perf_counter() - started


async def deliver(store: Store, concurrency: int, limit: float) -> tuple[int, float]:
    """Drain the route with a Deliverer whose send answers 200 at once; (delivered, seconds)."""

    async def send(message: Message) -> Outcome:
        return Outcome(status=200)

    async def queued() -> int:
        stats = (await store.stats(now=time.time()))["bench"]
        return stats.counts[Status.QUEUED] + stats.counts[Status.DELIVERING]

    before = await queued()
    finished = asyncio.Event()
    decided = 0

    def count(message: Message, decision: Decision) -> None:
        nonlocal decided
        decided += 1
        if decided >= before:
            finished.set()

    loop = Deliverer("bench", store, Schedule(RouteDelivery(concurrency=concurrency)), send, owner="bench",
                     lease=60.0, poll_interval=0.01, on_decision=count)
    started = time.perf_counter()
    loop.start()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            await finished.wait()
    elapsed = time.perf_counter() - started
    await loop.stop(grace=5.0)
    return before - await queued(), elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite", help="sqlite or a redis:// URL")
    parser.add_argument("--dir", type=Path, help="directory for the SQLite file (default: a new temp dir)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--limit", type=float, default=60.0, help="stop after this many seconds")
    parser.add_argument("--deliver", type=int, metavar="CONCURRENCY", help="then drain the queue this way")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        store: Store
        if args.store == "sqlite":
            from sidecar.delivery.sqlite_store import SqliteStore

            sqlite_store = await SqliteStore.open(Path(directory) / "delivery.sqlite3")
            store = sqlite_store
        else:
            from sidecar.delivery.redis_store import RedisStore

            store = await RedisStore.open(args.store, prefix=f"bench-{os.getpid()}:")
        try:
            await run(store, min(1000, args.messages), args.concurrency, args.body_size, args.limit)  # warm up
            commits_before = getattr(store, "commits", 0)
            cpu_before = cpu_seconds()
            done, elapsed = await run(store, args.messages, args.concurrency, args.body_size, args.limit)
            cpu = cpu_seconds() - cpu_before
            commits = getattr(store, "commits", 0) - commits_before
            if args.deliver:
                delivered, drained = await deliver(store, args.deliver, args.limit)
        finally:
            await store.close()
    line = (f"{args.store}: {done} accepts of {args.body_size} B by {args.concurrency} accepters in {elapsed:.2f} s:"
            f" {done / elapsed:,.0f} accepts/s, {cpu / done * 1e6:.0f} us CPU per accept")
    if args.store == "sqlite":
        line += f"; {commits} commits (synchronous=FULL), {done / max(commits, 1):.1f} accepts per commit"
    print(line)
    if args.deliver:
        print(f"{args.store}: delivered {delivered} with concurrency {args.deliver} in {drained:.2f} s:"
              f" {delivered / drained:,.0f} deliveries/s (store and loop only, no HTTP)")


if __name__ == "__main__":
    asyncio.run(main())
