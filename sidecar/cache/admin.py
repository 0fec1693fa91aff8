"""The cache's part of the admin API (docs/admin-openapi.yaml), added through AdminContext's hooks:

    DELETE /api/v1/cache?route=NAME&prefix=/PATH   drop stored entries (the admin token when set)
    cache_stats on each route of GET /api/v1/routes

With --workers N each worker has its own cache. A purge is made here in the worker that
answers, and `on_purged` tells the runtime, which passes it on to the other workers; they
apply it with `purge` too. `cache_stats` are the answering worker's.

The admin package knows nothing of the cache, and this module nothing of processes: the
runtime hands these the caches in force and the hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from sidecar.cache.layer import RouteCache

# The caches in force by route name (a reload replaces them); None for a route without `cache:`.
Caches = Callable[[], Mapping[str, RouteCache | None]]
# Told of each purge the endpoint made (route, or None for every cached route; prefix), after it.
Purged = Callable[[str | None, str], None]


def purge(caches: Mapping[str, RouteCache | None], route: str | None, prefix: str) -> dict[str, int]:
    """Drop the entries whose target starts with `prefix`, of `route` or of every cached route
    (None): how many went, by route. A route that is not there or has no cache is left out: the
    endpoint refuses those before, and another worker's purge may meet this one between configs."""
    chosen = list(caches) if route is None else [route]
    return {name: cache.store.purge(prefix) for name in chosen if (cache := caches.get(name)) is not None}


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status)


def admin_extension(caches: Caches, on_purged: Purged | None = None) -> Callable[[web.Application], None]:
    """For AdminContext.extensions: adds the purge endpoint."""

    async def purge_endpoint(request: web.Request) -> web.Response:
        route = request.query.get("route")
        prefix = request.query.get("prefix", "/")  # every target starts with /
        if not prefix.startswith("/"):
            return _error(400, "bad_request", f"prefix must start with / (a request target); got {prefix[:100]!r}")
        current = caches()
        if route is not None:
            if route not in current:
                return _error(404, "unknown_route", f"no route named {route[:100]}")
            if current[route] is None:
                return _error(409, "cache_disabled", f"route {route} has no cache")
        purged = purge(current, route, prefix)
        if on_purged is not None:
            on_purged(route, prefix)  # also when nothing went here: other workers may hold entries
        return web.json_response({"prefix": prefix, "purged": purged})

    def extend(app: web.Application) -> None:
        app.router.add_delete("/api/v1/cache", purge_endpoint)

    return extend


def route_extras(caches: Caches) -> Callable[[str], dict[str, Any]]:
    """For AdminContext.route_extras: a route's `cache_stats` in /api/v1/routes, null without a cache."""

    def stats(route: str) -> dict[str, Any]:
        cache = caches().get(route)
        return {"cache_stats": cache.snapshot() if cache is not None else None}

    return stats
