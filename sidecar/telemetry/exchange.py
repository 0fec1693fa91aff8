"""One request and its answer, as the access log and the metrics see it: filled in as the
request goes through the listener, recorded once when it ends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str  # the raw path and query as the caller sent them
    started: float  # loop time the request arrived
    route: str | None = None  # None: refused or unmatched before a route was chosen
    status: int = 500  # what the caller got (499: it hung up first)
    error: str | None = None  # the error kind of an answer the sidecar made itself
    duration: float = 0.0  # seconds until the answer was complete
    upstream_seconds: float = 0.0  # of all attempts together
    attempts: int = 0
    endpoint: str | None = None  # the endpoint of the last attempt
    breaker: str | None = None  # the route's breaker state at the end
    tunnelled: tuple[int, int] | None = None  # bytes in and out of a WebSocket connection
