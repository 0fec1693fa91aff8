"""Config sections of durable delivery: a route's `delivery:` and the top-level `delivery: {store}`.

Kept apart from `schema.py` so the delivery package can use them without importing the whole
document; `schema.Route` and `schema.Document` refer to them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sidecar.config.units import Duration, Size, duration, size

Positive = Annotated[int, Meta(ge=1)]
# An HTTP method token as written on the request line.
Method = Annotated[str, Meta(pattern=r"^[A-Z]+$")]
# "sqlite" (a file under the state directory) or a Redis URL (redis://host:port/db, rediss:// for TLS).
StoreSpec = Annotated[str, Meta(pattern=r"^(sqlite|rediss?://.+)$")]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class DeliveryBackoff(_Section, frozen=True):
    """Full jitter: each wait is random between 0 and min(max, base * 2^(attempts - 1))."""

    base: Duration = duration("1s")
    max: Duration = duration("5m")  # also the cap on an upstream's Retry-After


class RouteDelivery(_Section, frozen=True):
    """A route's `delivery:`: accept writes with 202, store them, deliver them later."""

    mode: Literal["always", "on_request"] = "always"  # on_request: only with `Prefer: respond-async`
    methods: tuple[Method, ...] = ("POST", "PUT", "PATCH", "DELETE")
    max_body: Size = size("1MiB")  # larger: 413, nothing stored
    max_attempts: Positive = 20
    ttl: Duration = duration("24h")  # from the time a message (re)entered the queue
    backoff: DeliveryBackoff = msgspec.field(default_factory=DeliveryBackoff)
    concurrency: Positive = 1  # 1: in the order accepted; more: in parallel, no order
    retention: Duration = duration("1h")  # how long delivered records stay for status lookups
    # Queued, in-flight and dead messages count; over either: 503 queue_full, nothing stored.
    max_pending: Positive = 100_000
    max_bytes: Size = size("256MiB")  # sum of stored bodies
    dedupe_window: Duration = duration("24h")  # the same Idempotency-Key on the route gets the same id
    # How long a worker holds the messages it claimed: a dead worker's come back after this.
    # None: lease_of's default. At least 2 x timeouts.total (checked when the config is loaded).
    lease: Duration | None = None


def lease_of(delivery: RouteDelivery, total: float) -> float:
    """A claim's lease, the same in every worker: `delivery.lease`, or by default twice the route's total
    timeout (a message is sent only while half its lease is left, so an attempt ends before it
    does) with 10 s to spare for recording the outcome."""
    return delivery.lease if delivery.lease is not None else 2 * total + 10.0


class DeliveryStore(_Section, frozen=True):
    """The top-level `delivery:`: where every queued route keeps its messages."""

    store: StoreSpec = "sqlite"
