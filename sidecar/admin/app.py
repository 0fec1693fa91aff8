"""The admin application: health, readiness, metrics, and /api/v1 (described in docs/admin-openapi.yaml)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.admin import api_v1
from sidecar.admin.context import AdminContext


def json_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status, headers=headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown paths and wrong methods answer in JSON like everything else here."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return json_error(404, "not_found", f"no admin endpoint at {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return json_error(405, "method_not_allowed", f"{request.method} is not allowed here; use {allowed}",
                          {"Allow": allowed})


def bearer_token(context: AdminContext) -> Middleware:
    """Mutating calls need `Authorization: Bearer <admin.token>` when a token is configured."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = context.config().admin_token  # read per call: a reload may change it
        if token and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return json_error(401, "unauthorized", "this call needs Authorization: Bearer <admin token>",
                                  {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def health_and_metrics(context: AdminContext) -> web.Application:
    """/healthz, /readyz and /metrics: all a prober or a scraper needs, nothing that mutates."""
    readiness = context.readiness

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # Content negotiation: Prometheus text by default, OpenMetrics when the scraper asks.
    app.router.add_get("/metrics", make_aiohttp_handler(context.registry))
    return app


def admin_app(context: AdminContext) -> web.Application:
    app = health_and_metrics(context)
    app.middlewares.append(bearer_token(context))
    api_v1.add_routes(app, context)
    for extend in context.extensions:
        extend(app)
    return app
