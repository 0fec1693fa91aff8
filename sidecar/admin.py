"""The admin listener: health, readiness and metrics, on its own (loopback) port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler


class Readiness:
    """Ready once the config is loaded and every listener is bound; not ready while stopping."""

    def __init__(self) -> None:
        self.ready = False


def admin_app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # Content negotiation: Prometheus text by default, OpenMetrics when the scraper asks.
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    return app
