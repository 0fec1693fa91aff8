"""Header rules of a proxy: hop-by-hop removal both ways, X-Forwarded-*, request ids."""

from __future__ import annotations

import os
import random

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1: meaningful only for one connection, so never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
REQUEST_ID = "X-Request-Id"
# End-to-end names most messages carry, spelled as aiohttp's parsers hand them over (they
# give names they know one canonical spelling, "Etag" for "ETag"). When a message's
# Connection header names no more headers (nearly always), these are kept without
# lower-casing them: the filters below run for every header of every request and response.
# None of them is hop-by-hop, Host, X-Forwarded-For, proxy-* or x-sidecar-*.
USUAL_END_TO_END = frozenset({
    hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT_LANGUAGE, hdrs.AUTHORIZATION, hdrs.CACHE_CONTROL,
    hdrs.CONTENT_ENCODING, hdrs.CONTENT_LENGTH, hdrs.CONTENT_TYPE, hdrs.COOKIE, hdrs.DATE, hdrs.ETAG,
    hdrs.EXPIRES, hdrs.LAST_MODIFIED, hdrs.LOCATION, hdrs.SERVER, hdrs.SET_COOKIE, hdrs.TRACEPARENT,
    hdrs.USER_AGENT, hdrs.VARY, hdrs.X_REQUEST_ID, "tracestate",
})
# A caller's fields the upstream never gets as sent: set by the forward step (Host), rebuilt here
# (X-Forwarded-For), answered by the sidecar (Expect), or meant for proxies and the sidecar.
_SET_HERE = frozenset({"host", "x-forwarded-for", "expect"})
_NOT_FORWARDED_PREFIXES = ("proxy-", "x-sidecar-")
_ids = random.Random()  # seeded from os.urandom, and again in a forked child so siblings differ
os.register_at_fork(after_in_child=_ids.seed)
_random_bits = _ids.getrandbits


def dropped_names(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Lower-case names not to forward: hop-by-hop ones and those the Connection header names.
    HOP_BY_HOP itself (the same object) when the Connection header names nothing more."""
    values = headers.getall("Connection", ())
    if not values or values == ["keep-alive"] or values == ["close"]:
        return HOP_BY_HOP  # the usual case, without building a set per message
    named = (token.strip().lower() for value in values for token in value.split(","))
    return HOP_BY_HOP.union(named)


def _usual(dropped: frozenset[str]) -> frozenset[str]:
    """The names that may skip lower-casing, given what a message's Connection header drops."""
    return USUAL_END_TO_END if dropped is HOP_BY_HOP else frozenset()


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], remote: str | None, scheme: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the upstream: end-to-end ones untouched, forwarding facts added.

    Host is left out: the forward step sets it to the endpoint it picked. x-sidecar-*
    headers are instructions to us, never forwarded. Expect is ours to answer (the
    caller's body is read, and `100 Continue` sent, by the sidecar), so it is not forwarded:
    an upstream's 100 would have nowhere to go.
    X-Forwarded-Proto/Host from a caller are kept (it may sit behind another proxy).
    """
    dropped = dropped_names(incoming)
    usual = _usual(dropped)
    out: CIMultiDict[str] = CIMultiDict([
        (name, value) for name, value in incoming.items()
        if name in usual or not (
            (lower := name.lower()) in dropped or lower in _SET_HERE or lower.startswith(_NOT_FORWARDED_PREFIXES)
        )
    ])
    chain = ", ".join(incoming.getall("X-Forwarded-For", ()))
    if remote:
        chain = f"{chain}, {remote}" if chain else remote
    if chain:
        out["X-Forwarded-For"] = chain
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = scheme
    if "X-Forwarded-Host" not in out and "Host" in incoming:
        out["X-Forwarded-Host"] = incoming["Host"]
    out[REQUEST_ID] = request_id
    return out


def downstream_fields(upstream: CIMultiDictProxy[str], dropped: frozenset[str]) -> list[tuple[str, str]]:
    """The upstream's end-to-end response headers, the ones a caller gets (`dropped`: its dropped_names)."""
    usual = _usual(dropped)
    return [
        (name, value) for name, value in upstream.items()
        if name in usual or ((lower := name.lower()) not in dropped and not lower.startswith("proxy-"))
    ]


def add_downstream_response_headers(out: CIMultiDict[str], upstream: CIMultiDictProxy[str], request_id: str) -> None:
    """Headers for the caller, added to the response's own (empty) headers: the upstream's
    end-to-end headers, plus the request id."""
    out.extend(downstream_fields(upstream, dropped_names(upstream)))
    if REQUEST_ID not in out:
        out[REQUEST_ID] = request_id


# Request fields whose value the upstream sees differently from the caller's, or not at all
# (upstream_request_headers): the hop-by-hop ones, those set here, and the added forwarding facts.
_REWRITTEN_UPSTREAM = HOP_BY_HOP | _SET_HERE | {"x-forwarded-proto", "x-forwarded-host", REQUEST_ID.lower()}


def same_upstream(name: str) -> bool:
    """Whether the upstream sees the caller's own value of the request field `name` (lower case):
    a response that varies only on such fields can be matched against the caller's headers."""
    return name not in _REWRITTEN_UPSTREAM and not name.startswith(_NOT_FORWARDED_PREFIXES)


def request_id_of(incoming: CIMultiDictProxy[str]) -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex. An id correlates logs, it guards
    # nothing, so it comes from the fast in-process generator rather than a getrandom(2)
    # syscall per request.
    return incoming.get(REQUEST_ID) or f"{_random_bits(128):032x}"


def encode_head(lines: list[str]) -> bytes | None:
    """A message head from its lines (each ends in CRLF; the last is the blank one), as bytes.

    None if a line holds a line break of its own: header values reach us through parsers that
    refuse them, and this keeps the promise for values we derive, so no message can be split
    in two on its way. surrogateescape: bytes a parser decoded leniently go out as they came.
    """
    head = "".join(lines)
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        return None
    return head.encode("utf-8", "surrogateescape")
