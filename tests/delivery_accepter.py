"""A process that accepts messages as fast as it can and prints each id once `accept` returned.

    python -m tests.delivery_accepter sqlite PATH
    python -m tests.delivery_accepter redis URL PREFIX

tests/test_delivery_store.py kills it (or the Redis under it) with SIGKILL mid-burst and then
checks that every printed id is in the store. Bounded: at most LIMIT messages; a task stops at
its first failed accept (the printed ids are the ones that got their "202").
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from sidecar.delivery.model import new_message
from sidecar.delivery.store import Limits, Store, StoreUnavailable

TASKS = 16
LIMIT = 200_000
LIMITS = Limits(max_pending=10**9, max_bytes=2**62, dedupe_window=3600.0)


async def open_store(argv: list[str]) -> Store:
    if argv[0] == "sqlite":
        from sidecar.delivery.sqlite_store import SqliteStore

        return await SqliteStore.open(Path(argv[1]))
    from sidecar.delivery.redis_store import RedisStore

    return await RedisStore.open(argv[1], prefix=argv[2])


async def main(argv: list[str]) -> None:
    store = await open_store(argv)
    budget = iter(range(LIMIT))

    async def accept_some(task: int) -> None:
        for number in budget:
            message = new_message(
                route="burst", method="POST", target=f"/m/{number}", headers=(("content-type", "text/plain"),),
                body=b"x" * 1024, idempotency_key=f"key-{number}", now=time.time(),
            )
            try:
                accepted = await store.accept(message, LIMITS)
            except StoreUnavailable:
                return
            sys.stdout.write(accepted.id + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(accept_some(task) for task in range(TASKS)))
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
