"""Fresh cache hits answered as soon as their request is parsed (issue 18's speed promise).

A fresh hit needs no upstream, no slot, no retry and no breaker, yet through the usual path
it still pays for everything aiohttp and the listener do for any request: a request object,
a task, an Exchange, a Call with the upstream's headers, the stack and a response object.
That costs more than the upstream hop the hit saves. So the wire offers each plain request
of an idle connection to `EarlyAnswers` first (wire/server_protocol.py), and a request that
is a fresh hit is answered right there, from the entry's head encoded when it was stored.

It is the same answer, not a second set of rules: the same request checks (refusal_of), the
same route match, the same cache decision (RouteCache.early_hit runs decide()), the same
bytes as whole_response.send_whole writes for a hit, and the same counts (the HIT, the
route's answered requests and duration, the access log line). Whatever is not the plainest
case is declined and takes the usual path: any method but GET, a caller's x-sidecar-*
limits (they may need a 400), Expect, Upgrade, a Connection header naming fields, a
caller's own conditional, Cache-Control or Pragma on the request, a route with
`delivery:`, a draining listener, an entry whose
Vary names a field the upstream would see differently, HEAD, 204 and bodies not framed by
Content-Length. A route without `cache:` is declined after the route match, and a listener
without cached routes installs nothing, so it costs nothing.
"""

from __future__ import annotations

import asyncio

from multidict import CIMultiDictProxy

from sidecar.cache.policy import CACHE_HEADER, Label
from sidecar.proxy.listener import (
    ATTEMPTS_HEADER,
    MAX_ATTEMPTS_HEADER,
    TIMEOUT_HEADER,
    UPSTREAM_MS_HEADER,
    Listener,
    upstream_target,
)
from sidecar.telemetry.exchange import Exchange
from sidecar.wire.headers import HOP_BY_HOP, REQUEST_ID, dropped_names, request_id_of
from sidecar.wire.request_checks import refusal_of
from sidecar.wire.whole_response import early_answer

# Request fields that send a request the usual way: admission reads them (a malformed
# x-sidecar-* value gets a 400), or the answer is more than the entry (100-continue, a
# WebSocket handshake).
_DECLINED = (MAX_ATTEMPTS_HEADER, TIMEOUT_HEADER, "Expect", "Upgrade")
_ATTEMPTS_LINES = f"{ATTEMPTS_HEADER}: 0\r\n", f"{UPSTREAM_MS_HEADER}: 0\r\n"  # no upstream attempt
_HTTP11 = (1, 1)  # the wire offers only HTTP/1.1 requests
_HIT_LINE = f"{CACHE_HEADER}: {Label.HIT.value}\r\n"


class EarlyAnswers:
    """The early answer of one listener's connections (GuardedServer.early_answer)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()

    def __call__(self, method: str, raw_path: str, headers: CIMultiDictProxy[str]) -> bytes | None:
        """The whole answer to a request that is a fresh hit, or None to let it take the usual path."""
        listener = self._listener
        if method != "GET" or listener.draining:
            return None
        route = listener.table.match(headers.get("Host", ""), raw_path)
        if route is None or (cache := route.state.cache) is None or route.queue is not None:
            return None
        if any(name in headers for name in _DECLINED) or dropped_names(headers) is not HOP_BY_HOP:
            return None
        if refusal_of(method, raw_path, _HTTP11, headers, False, listener.limits) is not None:
            return None  # the usual path answers it with its error
        started = self._loop.time()
        hit = cache.early_hit(upstream_target(route.spec, raw_path), headers)
        if hit is None:  # a miss costs the checks above and a dict lookup before the usual path
            return None
        entry, age = hit
        assert entry.head is not None  # early_hit returns only entries with one
        request_id = request_id_of(headers)
        lines = [f"Age: {age}\r\n", _HIT_LINE, f"{REQUEST_ID}: {request_id}\r\n", *_ATTEMPTS_LINES]
        answer = early_answer(entry.head, lines, entry.body)
        if answer is None:
            return None
        cache.counted(Label.HIT)
        state = route.state
        duration = self._loop.time() - started
        state.metrics.answered(method, entry.status, duration)
        access_log = listener.access_log
        if access_log.enabled:
            access_log.record(Exchange(
                request_id, method, raw_path, started, route.spec.name, entry.status, duration=duration,
                breaker=state.breaker.state if state.breaker else None,
            ))
        return answer
