"""What flows through the policy layers: a `Call` in, a `Response` (headers read, body not) out.

Layers see only these two and `SidecarError`s: never the upstream client, never aiohttp.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Endpoint
from sidecar.wire.body import Body, CallerBody


class Response(Protocol):
    """An upstream's answer on its way back through the layers: status and headers read, the
    body still to come. `release()` when done with it (the connection may be reused), `close()`
    to drop it at once. The upstream client's response is one; a cache hit can be another."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: StreamReader

    def release(self) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Call:
    """One request on its way upstream, and what its attempts have learned so far."""

    method: str
    target: str  # raw path and query as the upstream should see them
    headers: CIMultiDict[str]  # already cleaned of hop-by-hop and x-sidecar-* headers
    body: Body
    # What the caller asked for itself (x-sidecar-max-attempts, x-sidecar-timeout-ms):
    # it may only tighten the route's policy.
    max_attempts: int | None = None
    timeout: float | None = None
    upgrade: bool = False  # a WebSocket handshake: retried only when the connect failed
    deadline: float = math.inf  # loop time by which response headers must have arrived
    # Filled in by the forward step, read by retries and for the response headers.
    attempts: int = 0
    upstream_seconds: float = 0.0
    endpoint: Endpoint | None = None  # the endpoint of the latest attempt
    avoid: Endpoint | None = None  # an endpoint that just failed: pick another when there is one
    # Run once the response is complete (or failed), e.g. to free a concurrency slot.
    on_complete: list[Callable[[], None]] = field(default_factory=list)

    @property
    def body_replayable(self) -> bool:
        """Whether another attempt can send the body again: none, buffered, or not yet started."""
        return not (isinstance(self.body, CallerBody) and self.body.started)

    async def buffer_body(self, up_to: int) -> None:
        """Read a streamed body whose declared length is at most `up_to` into memory, so that
        a retry can replay it. A larger or undeclared one stays streamed."""
        if isinstance(self.body, CallerBody):
            length = self.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) <= up_to:
                self.body = await self.body.read_all()


# A handler answers a call with the upstream's response, its body still unread,
# or raises a SidecarError. A layer wraps a handler in one policy.
Handler = Callable[[Call], Awaitable[Response]]
Layer = Callable[[Handler], Handler]


def passthrough(inner: Handler) -> Handler:
    """The layer of a disabled policy: the stack keeps its shape, the call is untouched."""
    return inner
