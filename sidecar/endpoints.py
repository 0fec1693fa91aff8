"""Choosing an endpoint of an upstream: round robin."""

from __future__ import annotations

from sidecar.config import Endpoint, UpstreamSpec


class RoundRobin:
    """Hands out an upstream's endpoints in turn. One per upstream, shared by its routes."""

    __slots__ = ("_endpoints", "_next")

    def __init__(self, upstream: UpstreamSpec) -> None:
        self._endpoints = upstream.endpoints
        self._next = 0

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """The next endpoint in turn, skipping `avoid` (one that just failed) when another exists."""
        endpoint = self._endpoints[self._next % len(self._endpoints)]
        self._next += 1
        if endpoint == avoid and len(self._endpoints) > 1:
            endpoint = self._endpoints[self._next % len(self._endpoints)]
            self._next += 1
        return endpoint
