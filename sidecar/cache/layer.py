"""The response cache as a layer of a route's stack (issue 18).

Where it sits (proxy/stack.py): outermost,

    cache -> deadline -> limit -> retry -> circuit breaker -> forward

so a hit takes no concurrency slot and starts no deadline, and the failures it may cover
with a stale entry (circuit_open, overloaded, and the upstream's own after retries) all
reach it. It also works further in: it bounds followers by `call.deadline` when set.

Bodies: a response is buffered to be stored only when it is storable and its size is
known and at most `max_entry` before a byte is read: a Content-Length within the bound,
or a body that arrived whole with the headers. Anything else streams through as today,
never buffered. A buffered response is answered from the stored copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.cache.coalesce import Coalescer, Role
from sidecar.cache.policy import (
    CACHE_HEADER,
    REVALIDATING,
    STALE_REASON_HEADER,
    Action,
    Decision,
    Label,
    decide,
    failure_reason,
    may_serve_stale,
)
from sidecar.cache.rules import (
    LOOKUP_METHODS,
    Defaults,
    Fields,
    Headers,
    caller_conditional_matches,
    freshness,
    invalidates,
    not_modified_fields,
    revalidation_fields,
    selected_by,
    storable,
    stored_fields,
    updated_fields,
    variant_key,
    vary_names,
)
from sidecar.cache.store import Entry, Store
from sidecar.config.cache import Cache
from sidecar.errors import SidecarError, UpstreamTimeout
from sidecar.proxy.call import Call, Handler, Layer, Response, passthrough
from sidecar.wire.answer import PreparedHead, complete_content, prepare_head, read_whole
from sidecar.wire.headers import same_upstream

log = logging.getLogger("sidecar.cache")
CONDITIONAL_FIELDS = ("If-None-Match", "If-Modified-Since")
# Request fields that make a fresh hit more than its entry (RouteCache.early_hit).
_LEFT_TO_THE_STACK = ("Cache-Control", "Pragma", *CONDITIONAL_FIELDS)


class StoredResponse:
    """An answer made from a stored entry: a `Response` (proxy/call.py) whose `content` is a
    StreamReader already at EOF, and whose release()/close() have no connection to give back."""

    __slots__ = ("content", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        self.content = complete_content(body)

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(slots=True)
class Fetched:
    """One upstream exchange as the cache saw it; followers read only `entry` and `failure`."""

    entry: Entry | None = None  # stored (or refreshed by a 304): shareable
    label: Label = Label.MISS  # how `entry` came to be, for the caller who fetched it
    response: Response | None = None  # passed through; owned by the caller who fetched it
    failure: str | None = None  # a failure a stale entry may cover (error kind or status_NNN)
    error: SidecarError | None = None  # the error behind `failure`, raised when no entry covers it


def _shareable(fetched: Fetched) -> bool:
    return fetched.entry is not None or fetched.failure is not None


class RouteCache:
    """One route's cache: its store, its in-flight requests, its counts."""

    def __init__(self, route: str, spec: Cache, total_timeout: float, idle: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.route = route
        self.spec = spec
        self.total_timeout = total_timeout
        self.idle = idle
        self.clock = clock  # wall clock: entries are compared with Date and Expires headers
        self.loop = asyncio.get_running_loop()
        self.store = Store(spec.max_bytes, spec.max_entry, clock)
        self.coalescer: Coalescer[Fetched] = Coalescer(_shareable)
        self.defaults = Defaults(spec.default_ttl, spec.stale_if_error, spec.stale_while_revalidate)
        self.results: Counter[str] = Counter()  # answers by x-sidecar-cache label
        self.on_result: Callable[[str], None] | None = None  # e.g. a metrics counter's inc
        self._background: set[asyncio.Task[None]] = set()

    def snapshot(self) -> dict[str, Any]:
        """What the admin API may show for the route."""
        return {
            "entries": len(self.store), "bytes": self.store.bytes, "max_bytes": self.store.max_bytes,
            "evictions": self.store.evictions,
            "results": {label.lower(): count for label, count in self.results.items()},  # as in the metrics
        }

    def figures(self) -> tuple[int, int]:
        """(bytes held, evictions so far), for the metrics."""
        return self.store.bytes, self.store.evictions

    def close(self) -> None:
        """Stop background refreshes and let the entries go (on reload or shutdown)."""
        for task in self._background:
            task.cancel()
        self.store.purge()  # requests still in flight on this cache may hold it a while

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._background.add(task)  # referenced until done, and cancellable by close()
        task.add_done_callback(self._background.discard)

    def error_label(self, call: Call) -> str:
        """x-sidecar-cache of an error answer the sidecar makes on this route: the cache's label,
        or BYPASS (counted now) when the request was refused before it reached the cache."""
        if call.cache_label is None:
            self.counted(Label.BYPASS)
            call.cache_label = Label.BYPASS
        return call.cache_label

    def early_hit(self, target: str, headers: Headers) -> tuple[Entry, int] | None:
        """The entry that answers a plain GET of `target` fresh, and its Age in whole seconds,
        when the answer needs nothing but the entry and the caller's id (proxy/early.py writes
        it before aiohttp makes a request of it): decide() says SERVE and the entry has a
        prepared head. None otherwise, and the request takes the stack, where everything else
        is decided: a request that says anything about caching (Cache-Control, Pragma) or has
        a conditional of its own is left to it at once. Not counted: the caller counts the HIT
        once it has answered."""
        if target not in self.store or any(name in headers for name in _LEFT_TO_THE_STACK):
            return None
        entries = self.store.variants(target)
        if not entries:
            return None
        now = self.clock()
        decision = decide("GET", headers, entries, now)
        entry = decision.entry
        if decision.action is not Action.SERVE or entry is None or entry.head is None:
            return None
        return entry, int(entry.freshness.age(now))

    def counted(self, label: Label) -> None:
        self.results[label] += 1
        if self.on_result is not None:
            self.on_result(label)


def cache_layer(cache: RouteCache | None) -> Layer:
    if cache is None:  # no `cache:` on the route
        return passthrough

    def wrap(inner: Handler) -> Handler:
        return _CachedHandler(cache, inner).handle

    return wrap


class _CachedHandler:
    def __init__(self, cache: RouteCache, inner: Handler) -> None:
        self.cache = cache
        self.store = cache.store
        self.inner = inner

    async def handle(self, call: Call) -> Response:
        cache = self.cache
        try:
            now = cache.clock()
            key = call.target
            entries = self.store.variants(key) if call.method in LOOKUP_METHODS and not call.upgrade else []
            decision = decide(call.method, call.headers, entries, now, call.body is not None, call.upgrade)
            action, entry = decision.action, decision.entry
            if action is Action.BYPASS:
                cache.counted(Label.BYPASS)
                call.cache_label = Label.BYPASS  # shown only if the sidecar answers with an error
                response = await self.inner(call)
                if invalidates(call.method, response.status):
                    self.store.remove(key)
                return _labelled(response, Label.BYPASS)
            if action is Action.SERVE:
                assert entry is not None
                return self.answer(call.method, call.headers, entry, Label.HIT, now)
            if action is Action.SERVE_STALE:
                assert entry is not None
                self.refresh_in_background(call, decision)
                return self.answer(call.method, call.headers, entry, Label.STALE, now, REVALIDATING)
            if call.method == "HEAD":
                # HEAD responses are not stored and the request goes up as sent (the caller's own
                # conditionals too); the entry only stands in if the upstream fails.
                through = Decision(Action.FETCH, entry, decision.reason)
                return self.finish(call, through, await self.fetch(call, through, store=False), call.headers)
            conditions = _take_conditions(call.headers)  # answered here, from what gets stored
            if action is Action.REVALIDATE:
                assert entry is not None
                call.headers.extend(revalidation_fields(entry.freshness))
            if not cache.spec.coalesce:
                return self.finish(call, decision, await self.fetch(call, decision), conditions)
            return await self.coalesced(call, decision, conditions, key)
        except SidecarError:
            if call.cache_label is None:  # failed on its way upstream before the cache counted it
                cache.counted(Label.MISS)
                call.cache_label = Label.MISS
            raise

    async def coalesced(self, call: Call, decision: Decision, conditions: Headers, key: object,
                        rejoined: bool = False) -> Response:
        cache = self.cache
        deadline = call.deadline_within(cache.total_timeout, cache.loop.time())  # as the deadline layer sets it
        joined = await cache.coalescer.run(key, lambda: self.fetch(call, decision), deadline)
        if joined.role is Role.LED:
            assert joined.value is not None
            return self.finish(call, decision, joined.value, conditions)
        if joined.role is Role.TIMED_OUT:
            error = UpstreamTimeout("no answer in time from the upstream request this one was waiting for")
            return self.finish(call, decision, Fetched(failure=error.kind, error=error), conditions)
        shared = joined.value
        if shared is not None and shared.entry is not None:
            entry = shared.entry
            variant = variant_key(entry.vary, call.headers)
            if variant == entry.variant:
                return self.answer(call.method, conditions, entry, Label.COALESCED, cache.clock())
            if not rejoined:
                # Another variant of the resource: share one request with the callers of this variant.
                return await self.coalesced(call, decision, conditions, (key, variant), rejoined=True)
        if shared is not None and shared.failure is not None and may_serve_stale(decision.entry, cache.clock()):
            return self.finish(call, decision, Fetched(failure=shared.failure, error=shared.error), conditions)
        return self.finish(call, decision, await self.fetch(call, decision), conditions)  # ALONE

    async def fetch(self, call: Call, decision: Decision, store: bool = True) -> Fetched:
        """One upstream request; the answer stored when it may be. Failures a stale entry
        may cover come back as values, so coalesced followers can share the verdict."""
        cache = self.cache
        request_time = cache.clock()
        try:
            response = await self.inner(call)
        except SidecarError as error:
            reason = failure_reason(error_kind=error.kind)
            if reason is None:
                raise
            return Fetched(failure=reason, error=error)
        response_time = cache.clock()
        entry = decision.entry
        if response.status == 304 and entry is not None and decision.action is Action.REVALIDATE:
            response.release()  # a 304 has no body
            if selected_by(entry.freshness, response.headers):
                refreshed = self.refreshed(entry, response.headers, call.headers, request_time, response_time)
                self.store.put(call.target, refreshed)
                return Fetched(entry=refreshed, label=Label.REVALIDATED)
            # A 304 about another representation than the stored one: ask again, plainly.
            self.store.remove(call.target)
            for name in CONDITIONAL_FIELDS:
                call.headers.popall(name, None)
            return await self.fetch(call, Decision(Action.FETCH, None, "validator_mismatch"), store)
        reason = failure_reason(status=response.status)
        if reason is not None:
            return Fetched(response=response, failure=reason)
        if not store:
            return Fetched(response=response)
        allowed, _ = storable(call.method, response.status, call.headers, response.headers)
        size = _known_size(response, self.store.max_entry) if allowed else None
        if size is None:
            return Fetched(response=response)
        try:
            body = await read_whole(response, size, cache.idle)
        except SidecarError as error:  # UpstreamReset or UpstreamTimeout, both covered
            return Fetched(failure=error.kind, error=error)
        new = self.stored(response, body, call.headers, request_time, response_time)
        self.store.put(call.target, new)
        return Fetched(entry=new)

    def finish(self, call: Call, decision: Decision, fetched: Fetched, conditions: Headers) -> Response:
        cache = self.cache
        if fetched.entry is not None:
            return self.answer(call.method, conditions, fetched.entry, fetched.label, cache.clock())
        if fetched.failure is not None:
            now = cache.clock()
            if decision.entry is not None and may_serve_stale(decision.entry, now):
                if fetched.response is not None:
                    fetched.response.release()  # its body unread: the connection is closed, not reused
                return self.answer(call.method, conditions, decision.entry, Label.STALE, now, fetched.failure)
            if fetched.response is None:
                assert fetched.error is not None
                cache.counted(Label.MISS)
                call.cache_label = Label.MISS
                raise fetched.error
        assert fetched.response is not None
        cache.counted(Label.MISS)
        return _labelled(fetched.response, Label.MISS)

    def answer(self, method: str, conditions: Headers, entry: Entry, label: Label, now: float,
               stale_reason: str | None = None) -> StoredResponse:
        """The caller's answer from an entry: the whole response, or 304 when the caller's own
        conditional matches it; Age on everything not fetched just now."""
        self.cache.counted(label)
        status, reason, fields, body = entry.status, entry.reason, entry.headers, entry.body
        if conditions and caller_conditional_matches(conditions, entry.freshness):
            status, reason, fields, body = 304, "Not Modified", not_modified_fields(fields), b""
        headers = CIMultiDict(fields)
        if label is not Label.MISS:
            headers.popall("Age", None)
            headers["Age"] = str(int(entry.freshness.age(now)))
        headers[CACHE_HEADER] = label.value
        if stale_reason is not None:
            headers[STALE_REASON_HEADER] = stale_reason
        if method == "HEAD":
            body = b""  # the headers (Content-Length included) are the GET's; relay sends no body
        return StoredResponse(status, reason, headers, body)

    def stored(self, response: Response, body: bytes, request_headers: Headers, request_time: float,
               response_time: float) -> Entry:
        # X-Request-Id names one exchange: a later answer from the entry carries its own request's.
        fields = tuple(pair for pair in stored_fields(response.headers) if pair[0].lower() != "x-request-id")
        if "Content-Length" not in response.headers and response.status != 204:
            fields = (*fields, ("Content-Length", str(len(body))))  # framed as it will be sent
        vary = vary_names(response.headers)
        return Entry(
            response.status, response.reason, fields, body, request_time, response_time,
            variant_key(vary, request_headers), vary,
            freshness(response.headers, request_time, response_time, self.cache.defaults),
            _early_head(response.status, response.reason, fields, body, vary),
        )

    def refreshed(self, entry: Entry, not_modified: Headers, request_headers: Headers, request_time: float,
                  response_time: float) -> Entry:
        """The entry with the 304's fields and times (RFC 9111 4.3.4); its body unchanged."""
        fields = updated_fields(entry.headers, not_modified)
        headers = CIMultiDict(fields)
        vary = vary_names(headers)
        return Entry(
            entry.status, entry.reason, fields, entry.body, request_time, response_time,
            variant_key(vary, request_headers), vary,
            freshness(headers, request_time, response_time, self.cache.defaults),
            _early_head(entry.status, entry.reason, fields, entry.body, vary),
        )

    def refresh_in_background(self, call: Call, decision: Decision) -> None:
        """Stale-while-revalidate: one request refreshes the entry while callers get it stale."""
        cache = self.cache
        key = call.target
        if cache.coalescer.has_flight(key):
            return  # a request for this key is on its way already
        assert decision.entry is not None
        headers = CIMultiDict(call.headers)
        _take_conditions(headers)
        headers.extend(revalidation_fields(decision.entry.freshness))
        refresh = Call(method="GET", target=key, headers=headers, body=None)
        revalidate = Decision(Action.REVALIDATE if decision.entry.freshness.has_validator else Action.FETCH,
                              decision.entry, REVALIDATING)
        cache.in_background(self._refresh(refresh, revalidate))

    async def _refresh(self, call: Call, decision: Decision) -> None:
        cache = self.cache
        try:
            joined = await cache.coalescer.run(
                call.target, lambda: self.fetch(call, decision), cache.loop.time() + cache.total_timeout
            )
            if joined.role is Role.LED and joined.value is not None and joined.value.response is not None:
                joined.value.response.close()  # not storable: nobody reads it
        except Exception as error:  # noqa: BLE001 - a background refresh must not fail anyone's request
            log.debug("background refresh of %s failed: %r", call.target, error, extra={"route": cache.route})
        finally:
            for complete in call.on_complete:
                complete()


def _early_head(status: int, reason: str, fields: Fields, body: bytes, vary: tuple[str, ...]) -> PreparedHead | None:
    """The head a fresh hit on this entry sends, encoded now, when such a hit may be answered
    early (RouteCache.early_hit): the wire must send it in one go (prepare_head says), and its
    Vary names only fields the upstream sees as the caller sent them, so the caller's own
    headers select the same variant. Age is each answer's own."""
    if any(not same_upstream(name) for name in vary):
        return None
    return prepare_head(status, reason, ((name, value) for name, value in fields if name.lower() != "age"), body)


def _take_conditions(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Remove the caller's If-None-Match / If-Modified-Since (the cache answers them itself
    from the entry it stores, so the upstream sends a full, storable answer)."""
    taken: CIMultiDict[str] = CIMultiDict()
    for name in CONDITIONAL_FIELDS:
        for value in headers.popall(name, ()):
            taken.add(name, value)
    return taken


def _labelled(response: Response, label: Label) -> Response:
    """The upstream's response with x-sidecar-cache added (its parsed headers are read-only)."""
    headers = CIMultiDict(response.headers)
    headers[CACHE_HEADER] = label.value
    response.headers = CIMultiDictProxy(headers)
    return response


def _known_size(response: Response, limit: int) -> int | None:
    """The body's size when it is known before reading and at most `limit`; None otherwise."""
    length = response.headers.get("Content-Length")
    if length is not None:
        length = length.strip()
        return int(length) if length.isdigit() and int(length) <= limit else None
    content = response.content
    if content.is_eof() and content.total_bytes <= limit:
        return content.total_bytes  # no Content-Length, but it all came with the headers
    return None
