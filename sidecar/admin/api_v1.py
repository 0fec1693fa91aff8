"""/api/v1: routes, breakers (with operator overrides) and the live event stream."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sidecar.admin.context import AdminContext
from sidecar.config.describe import describe
from sidecar.errors import ReloadError
from sidecar.layers.breaker import Forced

FORCED: dict[str, Forced | None] = {"open": "open", "close": "closed", "reset": None}
HEARTBEAT_SECONDS = 15.0  # an SSE comment line keeps idle streams alive through proxies


def add_routes(app: web.Application, context: AdminContext) -> None:
    async def routes(request: web.Request) -> web.Response:
        described = describe(context.config())["routes"]
        for extras in context.route_extras:
            for route in described:
                route.update(extras(route["name"]))
        return web.json_response({"routes": described})

    def snapshot(route: str) -> dict[str, Any]:
        breaker = context.breakers()[route]
        if breaker is None:
            return {"route": route, "enabled": False, "state": None, "forced": False, "consecutive_failures": 0,
                    "opened_at": None, "next_probe_at": None, "recent_failures": []}
        return breaker.snapshot()

    async def breakers(request: web.Request) -> web.Response:
        return web.json_response({"breakers": [snapshot(route.name) for route in context.config().routes]})

    async def force(request: web.Request) -> web.Response:
        route, action = request.match_info["route"], request.match_info["action"]
        breakers = context.breakers()
        if route not in breakers:
            return web.json_response({"error": "unknown_route", "message": f"no route named {route}"}, status=404)
        breaker = breakers[route]
        if breaker is None:
            return web.json_response(
                {"error": "breaker_disabled", "message": f"route {route} has circuit_breaker.enabled: false"},
                status=409,
            )
        breaker.force(FORCED[action])
        return web.json_response(snapshot(route))

    async def events(request: web.Request) -> web.StreamResponse:
        bus = context.events
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        with bus.subscribe() as subscriber:
            await response.write(b": subscribed\n\n")  # the stream is live from here on
            while not bus.closed:
                event = await subscriber.next(HEARTBEAT_SECONDS)
                if event is None:
                    if not bus.closed:
                        await response.write(b": keepalive\n\n")
                    continue
                await response.write(f"event: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode())
        return response

    app.router.add_get("/api/v1/routes", routes)
    app.router.add_get("/api/v1/breakers", breakers)
    app.router.add_post("/api/v1/breakers/{route}/{action:open|close|reset}", force)
    async def reload(request: web.Request) -> web.Response:
        try:
            await context.reload()  # with workers, this also tells the others
        except ReloadError as exc:
            return web.json_response({"error": "invalid_config", "message": str(exc)}, status=400)
        return web.json_response({"status": "reloaded", "routes": [route.name for route in context.config().routes]})

    app.router.add_get("/api/v1/events", events)
    app.router.add_post("/api/v1/reload", reload)
