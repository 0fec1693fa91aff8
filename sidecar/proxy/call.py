"""What flows through the policy layers: a `Call` in, a `Response` (headers read, body not) out.

Layers see only these two and `SidecarError`s: never the upstream client, never aiohttp.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from multidict import CIMultiDict

from sidecar.config import Endpoint
from sidecar.wire.answer import Relayable
from sidecar.wire.body import Body, CallerBody

# An upstream's answer on its way back through the layers: status and headers read, the body
# still to come; `release()` when done with it (the connection may be reused), `close()` to drop
# it at once. The upstream client's response is one, a cache hit another. Declared once, in the
# wire (what relay.py can send), and named here for the layers, which import nothing of the wire.
Response = Relayable


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
    # Set by a route's cache when the request fails: the x-sidecar-cache of the sidecar's error answer.
    cache_label: str | None = None
    # Run once the upstream side is done (or failed), e.g. to free a concurrency slot: see complete().
    on_complete: list[Callable[[], None]] = field(default_factory=list)

    def complete(self) -> None:
        """Run the on_complete callbacks, once however often it is called: the relay calls it
        as soon as the upstream is done, the proxy again when the request ends, whatever happened."""
        callbacks = self.on_complete
        if callbacks:
            self.on_complete = []
            for callback in callbacks:
                callback()

    def deadline_within(self, total: float, now: float) -> float:
        """The request's deadline if it starts `now`: `total`, or the caller's shorter
        x-sidecar-timeout-ms (callers only tighten), and never later than one already set."""
        limit = total if self.timeout is None else min(total, self.timeout)
        return min(self.deadline, now + limit)

    @property
    def body_replayable(self) -> bool:
        """Whether another attempt can send the body again: none, buffered, or not yet started."""
        return not (isinstance(self.body, CallerBody) and self.body.started)


# A handler answers a call with the upstream's response, its body still unread,
# or raises a SidecarError. A layer wraps a handler in one policy.
Handler = Callable[[Call], Awaitable[Response]]
Layer = Callable[[Handler], Handler]


def passthrough(inner: Handler) -> Handler:
    """The layer of a disabled policy: the stack keeps its shape, the call is untouched."""
    return inner
