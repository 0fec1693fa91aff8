"""Header rules of a proxy: hop-by-hop removal both ways, X-Forwarded-*, request ids."""

from __future__ import annotations

import os
import random

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1: meaningful only for one connection, so never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
REQUEST_ID = "X-Request-Id"
_ids = random.Random()  # seeded from os.urandom, and again in a forked child so siblings differ
os.register_at_fork(after_in_child=_ids.seed)
_random_bits = _ids.getrandbits


def _dropped(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Lower-case names not to forward: hop-by-hop ones and those the Connection header names."""
    values = headers.getall("Connection", ())
    if not values or values == ["keep-alive"] or values == ["close"]:
        return HOP_BY_HOP  # the usual case, without building a set per message
    named = (token.strip().lower() for value in values for token in value.split(","))
    return HOP_BY_HOP.union(named)


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], remote: str | None, scheme: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the upstream: end-to-end ones untouched, forwarding facts added.

    Host is left out: the forward step sets it to the endpoint it picked. x-sidecar-*
    headers are instructions to us, never forwarded.
    X-Forwarded-Proto/Host from a caller are kept (it may sit behind another proxy).
    """
    dropped = _dropped(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in dropped or lower in ("host", "x-forwarded-for") or lower.startswith(("proxy-", "x-sidecar-")):
            continue
        out.add(name, value)
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


def add_downstream_response_headers(out: CIMultiDict[str], upstream: CIMultiDictProxy[str], request_id: str) -> None:
    """Headers for the caller, added to the response's own (empty) headers: the upstream's
    end-to-end headers, plus the request id."""
    dropped = _dropped(upstream)
    out.extend([
        (name, value) for name, value in upstream.items()
        if (lower := name.lower()) not in dropped and not lower.startswith("proxy-")
    ])
    if REQUEST_ID not in out:
        out[REQUEST_ID] = request_id


def request_id_of(incoming: CIMultiDictProxy[str]) -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex. An id correlates logs, it guards
    # nothing, so it comes from the fast in-process generator rather than a getrandom(2)
    # syscall per request.
    return incoming.get(REQUEST_ID) or f"{_random_bits(128):032x}"
