"""A queued route as the proxy sees it: which requests it takes, the 202 it answers, how it sends.

The listener asks `takes()` (one attribute check first: routes without `delivery` pay nothing
more) and hands the request's `Call` to `accept()`; the deliverer calls `send()`, which runs the
message through the route's stack built with its synchronous retries off (the queue's schedule
replaces them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config.delivery import RouteDelivery
from sidecar.delivery import store as stores
from sidecar.delivery.model import Message, Outcome, new_id, new_message
from sidecar.errors import BadRequest, CircuitOpen, PayloadTooLarge, QueueFull, QueueUnavailable, SidecarError
from sidecar.policy.retry import retry_after_seconds
from sidecar.proxy.call import Call, Handler
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import DeliveryMetrics
from sidecar.wire.answer import drain

IDEMPOTENCY_KEY = "Idempotency-Key"
# Where a message's status is, relative to the admin listener.
STATUS_PATH = "/api/v1/deliveries/{id}"
_MAX_KEY = 255  # a longer Idempotency-Key is refused: it is stored and indexed


def prefers_async(headers: CIMultiDictProxy[str]) -> bool:
    """`Prefer: respond-async` (RFC 7240): a token among the comma-separated preferences of any Prefer header."""
    for value in headers.getall("Prefer", ()):
        for preference in value.split(","):
            if preference.split(";", 1)[0].strip().lower() == "respond-async":
                return True
    return False


class RouteQueue:
    def __init__(
        self, route: str, policy: RouteDelivery, store: stores.Store, handler: Handler,
        breaker_open: Callable[[], bool], metrics: DeliveryMetrics, events: EventBus, idle: float = 60.0,
    ) -> None:
        self.idle = idle  # the route's timeouts.idle, between reads of an answer's body
        self.route = route
        self.policy = policy
        self.store = store
        self.handler = handler  # the route's stack with retries off
        self.breaker_open = breaker_open
        self.limits = stores.Limits.of(policy)
        self.methods = frozenset(policy.methods)
        self.metrics = metrics
        self.events = events
        self.wake: Callable[[], None] = lambda: None  # set to the deliverer's wake once it runs

    def takes(self, method: str, headers: CIMultiDictProxy[str]) -> bool:
        return method in self.methods and (self.policy.mode == "always" or prefers_async(headers))

    async def accept(self, call: Call) -> web.Response:
        """Store the request durably and answer 202, or raise the SidecarError that says why not."""
        headers = call.headers.copy()
        keys = headers.popall(IDEMPOTENCY_KEY, [])
        caller_key = keys[-1].strip() if keys else None
        if caller_key is not None and not 0 < len(caller_key) <= _MAX_KEY:
            raise BadRequest(f"Idempotency-Key must be 1 to {_MAX_KEY} characters")
        # Host is set by the forward step to the endpoint it picks; the body's framing is the
        # stored body's own length on every attempt.
        for name in ("Host", "Content-Length", "Transfer-Encoding"):
            headers.popall(name, None)
        body = await self._body(call)
        now = time.time()
        message = new_message(
            route=self.route, method=call.method, target=call.target, headers=tuple(headers.items()), body=body,
            idempotency_key=caller_key, now=now, message_id=new_id(now),
        )
        try:
            accepted = await self.store.accept(message, self.limits, dedupe=caller_key is not None)
        except stores.QueueFull as full:
            self.events.publish_limited("queue_full", self.route, limit=full.limit)
            raise QueueFull(f"the route's delivery queue is at its {full.limit}; nothing was stored") from None
        except stores.StoreUnavailable as exc:
            raise QueueUnavailable(f"the delivery store cannot take the message: {exc}") from None
        if accepted.duplicate:
            self.metrics.outcome(self.route, "deduplicated")
        else:
            self.wake()
        return web.json_response(
            {"id": accepted.id, "status": "queued", "route": self.route}, status=202,
            headers={"Location": STATUS_PATH.format(id=accepted.id)},
        )

    async def _body(self, call: Call) -> bytes:
        """The whole body, refused with 413 past `max_body` (nothing is stored then)."""
        limit = self.policy.max_body
        too_large = PayloadTooLarge(f"the request body is larger than the route's delivery.max_body ({limit} bytes)")
        body = call.body
        if body is None:
            return b""
        if isinstance(body, bytes):
            if len(body) > limit:
                raise too_large
            return body
        declared = call.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # refused before reading it
        chunks: list[bytes] = []
        received = 0
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def send(self, message: Message) -> Outcome:
        """One delivery attempt through the route's stack: its status, or the kind of failure."""
        headers: CIMultiDict[str] = CIMultiDict(message.headers)
        headers[IDEMPOTENCY_KEY] = message.idempotency_key
        call = Call(method=message.method, target=message.target, headers=headers, body=message.body)
        try:
            try:
                response = await self.handler(call)
            except CircuitOpen as error:
                return Outcome(error=error.kind, retry_after=float(error.retry_after))
            except SidecarError as error:
                return Outcome(error=error.kind)
            # Read and dropped, whole or not: the status decides the outcome either way.
            await drain(response, self.idle)
        finally:
            call.complete()  # frees the route's concurrency slot
        after = retry_after_seconds(response.headers.get("Retry-After"), time.time())
        return Outcome(status=response.status, retry_after=after)

