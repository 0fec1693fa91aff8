"""/api/v1/deliveries: look at stored messages, retry or redrive dead letters, delete one.

Added to the admin app through AdminContext.extensions; mutations are behind the admin token
like every other non-GET admin call (the bearer middleware covers them). The service is read
per request: the first route with `delivery:` may arrive with a reload.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sidecar.delivery.model import Message, Status
from sidecar.delivery.store import StoreUnavailable
from sidecar.telemetry.timestamps import iso

if TYPE_CHECKING:
    from sidecar.delivery.service import DeliveryService

MAX_PAGE = 1000
_ID = re.compile(r"^[0-9a-f]{1,64}$")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status)


def _time(value: float | None) -> str | None:
    return iso(value) if value else None


def view(message: Message) -> dict[str, Any]:
    """What the admin API shows of a message: never its body or headers (they may carry secrets)."""
    return {
        "id": message.id, "route": message.route, "status": message.status.value, "method": message.method,
        "target": message.target, "size": message.size, "attempts": message.attempts,
        "last_error": message.last_error, "last_status": message.last_status, "dead_reason": message.dead_reason,
        "accepted_at": _time(message.accepted_at), "queued_at": _time(message.queued_at),
        "updated_at": _time(message.updated_at),
        "next_attempt_at": _time(message.next_attempt_at) if message.status is Status.QUEUED else None,
    }


def delivery_routes(service: Callable[[], DeliveryService | None]) -> Callable[[web.Application], None]:
    def add(app: web.Application) -> None:
        async def listing(request: web.Request) -> web.Response:
            query = request.query
            route = query.get("route") or None
            status_text = query.get("status")
            if status_text is not None and status_text not in Status.__members__.values():
                return _error(400, "bad_request", "status must be one of queued, delivering, delivered, dead")
            limit_text = query.get("limit", "100")
            if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text[:6]) <= MAX_PAGE):
                return _error(400, "bad_request", f"limit must be a whole number from 1 to {MAX_PAGE}")
            after = query.get("after")
            if after is not None and not _ID.match(after):
                return _error(400, "bad_request", "after must be a delivery id from a previous page")
            delivery = service()
            if delivery is None:
                return web.json_response({"deliveries": [], "after": None})
            page = await delivery.store.list(
                route, Status(status_text) if status_text else None, int(limit_text), after)
            return web.json_response({"deliveries": [view(m) for m in page.messages], "after": page.after})

        async def one(request: web.Request) -> web.Response:
            found = await _message(request)
            return found if isinstance(found, web.Response) else web.json_response(view(found))

        async def retry(request: web.Request) -> web.Response:
            found = await _message(request)
            if isinstance(found, web.Response):
                return found
            delivery = service()
            assert delivery is not None  # _message found it in the store
            if not await delivery.store.retry(found.id, now=time.time()):
                return _error(409, "not_retryable", f"delivery {found.id} is {found.status.value}: only queued "
                              "and dead ones can be retried")
            _wake(delivery, found.route)
            again = await delivery.store.get(found.id)
            return web.json_response(view(again or found))

        async def redrive(request: web.Request) -> web.Response:
            route = request.query.get("route", "")
            delivery = service()
            if delivery is None or route not in delivery.queues:
                return _error(404, "unknown_route", f"no route named {route!r} has delivery")
            count = await delivery.store.redrive(route, now=time.time())
            _wake(delivery, route)
            return web.json_response({"route": route, "redriven": count})

        async def delete(request: web.Request) -> web.Response:
            found = await _message(request)
            if isinstance(found, web.Response):
                return found
            delivery = service()
            assert delivery is not None
            await delivery.store.delete(found.id)
            return web.json_response({"id": found.id, "deleted": True})

        async def _message(request: web.Request) -> Message | web.Response:
            message_id = request.match_info["id"]
            delivery = service()
            message = await delivery.store.get(message_id) if delivery and _ID.match(message_id) else None
            if message is None:
                return _error(404, "not_found", f"no delivery with id {message_id!r}")
            return message

        app.router.add_get("/api/v1/deliveries", _guarded(listing))
        app.router.add_post("/api/v1/deliveries/redrive", _guarded(redrive))
        # Ids are hex: "redrive" never matches {id}, so that path allows POST alone.
        app.router.add_get("/api/v1/deliveries/{id:[0-9a-f]{1,64}}", _guarded(one))
        app.router.add_post("/api/v1/deliveries/{id:[0-9a-f]{1,64}}/retry", _guarded(retry))
        app.router.add_delete("/api/v1/deliveries/{id:[0-9a-f]{1,64}}", _guarded(delete))

    return add


View = Callable[[web.Request], Awaitable[web.Response]]


def _guarded(handler: View) -> View:
    """A store that cannot be read or written answers 503 queue_unavailable, not a traceback."""

    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            return _error(503, "queue_unavailable", f"the delivery store cannot be read or written: {exc}")

    return guarded


def _wake(delivery: DeliveryService, route: str) -> None:
    queue = delivery.queues.get(route)
    if queue is not None:
        queue.wake()
