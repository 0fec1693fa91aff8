"""What flows through the policy layers: a `Call` in, an upstream response (headers read, body not) out."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from multidict import CIMultiDict

from sidecar.body import Body
from sidecar.config import Endpoint
from sidecar.upstream_client import UpstreamResponse


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
    deadline: float = math.inf  # loop time by which response headers must have arrived
    # Filled in by the forward step, read by retries and for the response headers.
    attempts: int = 0
    upstream_seconds: float = 0.0
    endpoint: Endpoint | None = None  # the endpoint of the latest attempt
    avoid: Endpoint | None = None  # an endpoint that just failed: pick another when there is one
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


# A handler answers a call with the upstream's response, its body still unread,
# or raises a SidecarError. A layer wraps a handler in one policy.
Handler = Callable[[Call], Awaitable[UpstreamResponse]]
Layer = Callable[[Handler], Handler]


def passthrough(inner: Handler) -> Handler:
    """The layer of a disabled policy: the stack keeps its shape, the call is untouched."""
    return inner
