"""The traffic listeners handle each request in its connection's task (protocol.handle_requests_inline),
and leave every other task on the loop as asyncio makes it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from sidecar.protocol import GuardedHandler, handle_requests_inline
from tests.conftest import Gate, SidecarFactory, Upstream, route_yaml


def tasks_running(code: object) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if getattr(task.get_coro(), "cr_code", None) is code]


def ours(task: asyncio.Task[Any]) -> bool:
    frame = getattr(task.get_coro(), "cr_frame", None)
    return frame is not None and isinstance(frame.f_locals.get("self"), GuardedHandler)


async def test_a_request_runs_in_its_connection_task(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    proxy = await sidecar_factory(route_yaml(upstream.url))
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
    await gate.until_waiting(1)
    assert tasks_running(GuardedHandler._handle_request.__code__) == []  # no task of its own
    # aiohttp's connection loop (the test upstream runs one too, with a task per request).
    connections = [task for task in tasks_running(GuardedHandler.start.__code__) if ours(task)]
    assert len(connections) == 1
    writer.close()  # hanging up still cancels the request: test_failures' caller_gone test
    gate.release.set()


async def test_other_tasks_are_made_as_before_and_a_previous_factory_still_runs() -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def previous(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        made.append(coroutine.__qualname__)
        return asyncio.Task(coroutine, loop=loop, **kwargs)

    loop.set_task_factory(previous)
    try:
        handle_requests_inline(loop)
        handle_requests_inline(loop)  # a second sidecar on the loop: installed once

        async def answer() -> int:
            return 42

        task = asyncio.create_task(answer())
        assert isinstance(task, asyncio.Task) and await task == 42
        assert made == [answer.__qualname__]
    finally:
        loop.set_task_factory(None)
