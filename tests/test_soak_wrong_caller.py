"""Soak: an upstream that misbehaves on kept-alive connections never hands one caller's answer,
or a leftover, to another caller (issue 15.1). Each answer names the request it answers.

The limit no HTTP/1.1 client can pass: a late second response that arrives while a request is
already in flight on that connection looks exactly like that request's answer. The sidecar
closes a connection on every byte that arrives with no request in flight or past a response's
end, and then distrusts the endpoint (no connection reused for DISTRUST_SECONDS), so once an
upstream has shown it sends bytes nobody asked for, none can reach a caller. The seed below
makes the first misbehaviour a detectable one (extra bytes in the same write); from then on,
every shape, late responses included, meets only fresh connections.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import RawBehaviour, SidecarFactory, route_yaml

CALLERS = 16
REQUESTS_EACH = 60
SEED = 1515  # the misbehaviours are random, the run is repeatable


def answer(rid: str) -> bytes:
    body = f"rid={rid}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def misbehaving(rng: random.Random) -> RawBehaviour:
    """Answers each request with its own rid; now and then adds bytes nobody asked for."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(10_000):
            head = await reader.readuntil(b"\r\n\r\n")
            rid = head.split(b" ", 2)[1].decode()
            roll = rng.random()
            if roll < 0.05:  # a complete extra response in the same write
                writer.write(answer(rid) + answer("STALE-EXTRA"))
            elif roll < 0.10:  # the start of another response in the same write
                writer.write(answer(rid) + b"HTTP/1.1 200 OK\r\nContent-Le")
            elif roll < 0.15:  # a late second response a moment later
                writer.write(answer(rid))
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.0, 0.02))
                writer.write(answer("STALE-LATER"))
            elif roll < 0.18:  # a 408 before closing an idle connection, and the close later
                writer.write(answer(rid))
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.0, 0.01))
                writer.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                return
            else:
                writer.write(answer(rid))
            await writer.drain()

    return serve


@pytest.mark.slow
async def test_no_answer_ever_reaches_the_wrong_caller(
    sidecar_factory: SidecarFactory, raw_upstream: Callable[[RawBehaviour], Awaitable[int]]
) -> None:
    port = await raw_upstream(misbehaving(random.Random(SEED)))
    # No breaker: the soak is about which bytes reach whom, not about shedding load.
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{port}", "circuit_breaker: {enabled: false}"))
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []

    async def caller(number: int) -> None:
        async with aiohttp.ClientSession() as session:
            for index in range(REQUESTS_EACH):
                rid = f"/c{number}/r{index}"
                async with session.get(proxy.url + rid) as response:
                    body = await response.read()
                if response.status == 200:
                    outcomes["own answer" if body == f"rid={rid}".encode() else "wrong"] += 1
                    if body != f"rid={rid}".encode():
                        wrong.append(f"{rid} got {body[:40]!r}")
                else:
                    outcomes[f"{response.status} {response.headers.get('x-sidecar-error')}"] += 1

    async with asyncio.timeout(60):
        await asyncio.gather(*(caller(number) for number in range(CALLERS)))
    assert wrong == [], f"{len(wrong)} answers reached the wrong caller: {wrong[:5]}"
    assert outcomes["own answer"] == CALLERS * REQUESTS_EACH, outcomes
    assert proxy.metric("sidecar_upstream_unsolicited_closes_total", endpoint=f"http://127.0.0.1:{port}") > 0
