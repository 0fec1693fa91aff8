"""What flows through the policy layers: a `Call` in, an upstream response (headers read, body not) out."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import ClientResponse
from multidict import CIMultiDict


@dataclass(slots=True)
class Call:
    """One request on its way upstream. Layers may tighten `deadline`; nothing else changes it."""

    method: str
    target: str  # raw path and query as the upstream should see them
    headers: CIMultiDict[str]  # already cleaned of hop-by-hop headers
    body: AsyncIterator[bytes] | None
    deadline: float = math.inf  # loop time by which response headers must have arrived


# A handler answers a call with the upstream's response, its body still unread,
# or raises a SidecarError. A layer wraps a handler in one policy.
Handler = Callable[[Call], Awaitable[ClientResponse]]
Layer = Callable[[Handler], Handler]


def passthrough(inner: Handler) -> Handler:
    """The layer of a disabled policy: the stack keeps its shape, the call is untouched."""
    return inner
