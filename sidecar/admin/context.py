"""What the admin app reads and does, handed to it explicitly by the runtime.

The admin package never imports the runtime: a room (delivery, cache, ...) adds its own
admin endpoints through `extensions`, and a reload goes through `reload`, which already
tells sibling workers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.config import Config
from sidecar.layers.breaker import RouteBreaker
from sidecar.telemetry.events import EventBus


class Readiness:
    """Ready once the config is loaded and every listener is bound; not ready while stopping."""

    def __init__(self) -> None:
        self.ready = False


@dataclass(frozen=True, slots=True)
class AdminContext:
    readiness: Readiness
    registry: CollectorRegistry  # what /metrics serves (with workers: the merged view)
    events: EventBus
    config: Callable[[], Config]  # the config in force now (a reload replaces it)
    breakers: Callable[[], Mapping[str, RouteBreaker | None]]  # by route; None: breaker disabled
    reload: Callable[[], Awaitable[None]]  # from the config file; raises ReloadError when refused
    # Rooms add their own endpoints under /api/v1 (e.g. deliveries, cache purge).
    extensions: tuple[Callable[[web.Application], None], ...] = field(default=())
    # Rooms add live figures to a route's entry in /api/v1/routes: route name -> extra keys.
    route_extras: tuple[Callable[[str], dict[str, Any]], ...] = field(default=())
