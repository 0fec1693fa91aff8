"""What the cache does with a request, and whether a stored entry may stand in for a failure.

    decide()          before the upstream: SERVE (fresh hit), SERVE_STALE (within
                      stale-while-revalidate, refreshed in the background), REVALIDATE
                      (stale, has a validator), FETCH (nothing usable stored), BYPASS
    stale_reason()    after the upstream failed: the reason to answer with the entry
                      instead, or None (outside its stale-if-error window, or not a failure)

Pure: the entries and the clock are arguments.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.cache.rules import (
    LOOKUP_METHODS,
    UNEVALUATED_REQUEST_FIELDS,
    Headers,
    fresh_for,
    request_directives,
    variant_key,
)
from sidecar.cache.store import Entry

CACHE_HEADER = "x-sidecar-cache"
STALE_REASON_HEADER = "x-sidecar-stale-reason"
# Error kinds (sidecar/errors.py) and statuses after which a stored entry may answer instead.
STALE_ON_ERRORS = frozenset({"connect_failure", "upstream_reset", "timeout", "circuit_open", "overloaded"})
STALE_ON_STATUSES = frozenset({500, 502, 503, 504})
# The stale reason of an entry served while a background request refreshes it.
REVALIDATING = "stale_while_revalidate"


class Label(enum.StrEnum):
    """The value of x-sidecar-cache: how the answer was made."""

    MISS = "MISS"  # from the upstream (and stored, if it could be)
    HIT = "HIT"  # a fresh entry; the upstream was not contacted
    STALE = "STALE"  # an entry past its freshness (x-sidecar-stale-reason says why)
    REVALIDATED = "REVALIDATED"  # a stale entry the upstream confirmed with 304
    BYPASS = "BYPASS"  # the cache took no part (method, no-store, ranges, preconditions)
    COALESCED = "COALESCED"  # shared from a concurrent caller's upstream request


class Action(enum.Enum):
    SERVE = "serve"
    SERVE_STALE = "serve_stale"
    REVALIDATE = "revalidate"
    FETCH = "fetch"
    BYPASS = "bypass"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    entry: Entry | None  # the stored response selected for this request, if any
    reason: str  # why, for logs and tests


def select(entries: Iterable[Entry], request_headers: Headers) -> Entry | None:
    """The most recent stored response whose Vary'd fields match the request (RFC 9111 4.1)."""
    for entry in entries:  # most recent first
        if variant_key(entry.vary, request_headers) == entry.variant:
            return entry
    return None


def decide(method: str, request_headers: Headers, entries: Iterable[Entry], now: float,
           has_body: bool = False, upgrade: bool = False) -> Decision:
    """What to do with a request, given the entries stored under its target."""
    if method not in LOOKUP_METHODS:
        return Decision(Action.BYPASS, None, "method")
    if upgrade:  # a WebSocket handshake: only the upstream can answer it (with its 101)
        return Decision(Action.BYPASS, None, "upgrade")
    if has_body:  # a GET with a body (search APIs do this): the target alone is not its key
        return Decision(Action.BYPASS, None, "request_body")
    directives = request_directives(request_headers)
    if directives.no_store:
        return Decision(Action.BYPASS, None, "request_no_store")
    for name in UNEVALUATED_REQUEST_FIELDS:
        if name in request_headers:
            return Decision(Action.BYPASS, None, name.lower())
    entry = select(entries, request_headers)
    if entry is None:
        return Decision(Action.FETCH, None, "no_entry")
    stored = entry.freshness
    if fresh_for(directives, stored, now):
        return Decision(Action.SERVE, entry, "fresh")
    if not directives.no_cache and stored.stale_while_revalidate > 0 and (
        0 <= stored.staleness(now) <= stored.stale_while_revalidate
    ):
        return Decision(Action.SERVE_STALE, entry, REVALIDATING)
    reason = "request_no_cache" if directives.no_cache else "stale"
    if stored.has_validator:
        return Decision(Action.REVALIDATE, entry, reason)
    return Decision(Action.FETCH, entry, reason)


def failure_reason(error_kind: str | None = None, status: int | None = None) -> str | None:
    """The stale reason for an upstream outcome, or None when it is not a failure the cache covers."""
    if error_kind is not None:
        return error_kind if error_kind in STALE_ON_ERRORS else None
    if status is not None and status in STALE_ON_STATUSES:
        return f"status_{status}"
    return None


def may_serve_stale(entry: Entry | None, now: float) -> bool:
    """Whether `entry` is within its stale-if-error window (or still fresh) at `now`."""
    return entry is not None and entry.freshness.staleness(now) <= entry.freshness.stale_if_error


def stale_reason(entry: Entry | None, now: float, error_kind: str | None = None,
                 status: int | None = None) -> str | None:
    """After an upstream failure: the reason to serve `entry` instead, or None to pass the failure on."""
    reason = failure_reason(error_kind, status)
    if reason is None or not may_serve_stale(entry, now):
        return None
    return reason
