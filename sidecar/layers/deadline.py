"""Total deadline: every attempt and every backoff of a request fits inside `timeouts.total`
(or the caller's shorter x-sidecar-timeout-ms)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from sidecar.config.model import RouteTimeouts
from sidecar.proxy.call import Call, Handler, Layer, Response


def deadline_layer(timeouts: RouteTimeouts) -> Layer:
    total = timeouts.total
    loop = asyncio.get_running_loop()

    def wrap(inner: Handler) -> Handler:
        def within_deadline(call: Call) -> Awaitable[Response]:
            # The deadline is a stamp, not a timer: the forward step gives each attempt
            # min(per_try, time left) and raises `timeout` when nothing is left, so
            # there is exactly one timer per attempt and errors stay specific.
            # A plain function handing on the inner awaitable: no coroutine of its own.
            call.deadline = call.deadline_within(total, loop.time())
            return inner(call)

        return within_deadline

    return wrap
