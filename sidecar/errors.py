"""Every error the sidecar answers for itself, and the one place that turns them into responses.

    SidecarError                   a response the sidecar makes itself
    +-- NoRoute                    404 no_route: nothing matches; never forwarded
    +-- CallerError                the caller's request is at fault
    |   +-- BadRequest             400 bad_request: absolute-form target, dot-segments, bad x-sidecar-* header
    |   +-- MethodNotAllowed       405 method_not_allowed: CONNECT (this is not a forward proxy)
    |   +-- PayloadTooLarge        413 payload_too_large: body over the route's limits.max_body
    |   +-- UriTooLong             414 uri_too_long: request line over server.max_request_line
    |   +-- HeaderTooLarge         431 header_too_large: a header over server.max_header_size, or too many
    |   +-- RequestBodyTimeout     408 request_timeout: the body went silent (server.body_timeout, or idle)
    |   +-- CallerGone             499 caller_gone: the caller hung up mid-body (nobody reads this answer)
    |   +-- CallerTooSlow          caller_too_slow: took nothing of an answer for server.send_timeout and was
    |                              cut off (never an answer: the access log's `error` on the line of one
    |                              whose head had gone out, as caller_gone, timeout and upstream_reset are)
    |   +-- NotImplementedCoding   501 not_implemented: a transfer coding other than chunked
    |   +-- HttpVersionNotSupported  505 http_version_not_supported: a request line other than HTTP/1.0 or 1.1
    +-- Shed                       refused to protect the upstream or the route; never retried
    |   +-- CircuitOpen            503 circuit_open: the breaker is open; Retry-After says when it probes
    |   +-- Overloaded             503 overloaded: the route's concurrency limit and queue are full
    +-- QueueRefused               a delivery route could not store the write (never a 202); no fallback
    |   +-- QueueFull              503 queue_full: the route is at its delivery max_pending or max_bytes
    |   +-- QueueUnavailable       503 queue_unavailable: the delivery store cannot take a write now
    +-- UpstreamError              the upstream could not give us a response
        +-- ConnectFailure         502 connect_failure: TCP connect refused or timed out (provably unsent)
        +-- UpstreamReset          502 upstream_reset: connection dropped before response headers
        +-- BadUpstreamResponse    502 bad_upstream_response: the upstream spoke broken HTTP
        +-- UpstreamTimeout        504 timeout: per-try or total deadline passed before headers

Upstream responses, 5xx included, are not errors here: they pass through untouched.
Foreign exceptions (aiohttp, OSError) are mapped to these at the network edge, in
`wire/upstream_client.py` (and a per-try timeout in `proxy/forward.py`). The answers are rendered
in one place, `wire/responses.py`.
Callers tell our answers from the upstream's by the `x-sidecar-error` header.
"""

from __future__ import annotations

import json

ERROR_HEADER = "x-sidecar-error"


class SidecarError(Exception):
    kind = "internal"
    status = 500
    # Whether the condition is transient: trying again later may succeed.
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoRoute(SidecarError):
    kind = "no_route"
    status = 404


class CallerError(SidecarError):
    pass


class BadRequest(CallerError):
    kind = "bad_request"
    status = 400


class MethodNotAllowed(CallerError):
    kind = "method_not_allowed"
    status = 405


class PayloadTooLarge(CallerError):
    kind = "payload_too_large"
    status = 413


class UriTooLong(CallerError):
    kind = "uri_too_long"
    status = 414


class HeaderTooLarge(CallerError):
    kind = "header_too_large"
    status = 431


class RequestBodyTimeout(CallerError):
    kind = "request_timeout"
    status = 408


class CallerGone(CallerError):
    kind = "caller_gone"
    status = 499


class CallerTooSlow(CallerError):
    kind = "caller_too_slow"
    status = 408  # never sent: the answer's own status had gone out (see the tree above)


class NotImplementedCoding(CallerError):
    # 5xx although the caller's message is the cause: RFC 9112 6.1 names 501 for a transfer
    # coding the server does not understand, and 505 is the status for an HTTP version.
    kind = "not_implemented"
    status = 501


class HttpVersionNotSupported(CallerError):
    kind = "http_version_not_supported"
    status = 505


class Shed(SidecarError):
    status = 503
    retryable = True


class CircuitOpen(Shed):
    kind = "circuit_open"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # whole seconds until the breaker lets a probe through


class Overloaded(Shed):
    kind = "overloaded"

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit  # which limit refused: concurrent, pending or queue_timeout


class QueueRefused(SidecarError):
    status = 503
    retryable = True


class QueueFull(QueueRefused):
    kind = "queue_full"


class QueueUnavailable(QueueRefused):
    kind = "queue_unavailable"


class UpstreamError(SidecarError):
    status = 502
    retryable = True


class ConnectFailure(UpstreamError):
    kind = "connect_failure"


class UpstreamReset(UpstreamError):
    kind = "upstream_reset"


class BadUpstreamResponse(UpstreamError):
    kind = "bad_upstream_response"
    retryable = False


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class ReloadError(Exception):
    """A config reload that was refused; the message is what `sidecar check` would say."""


def error_document(error: SidecarError, route: str | None, attempts: int = 0) -> bytes:
    """The JSON body of every answer the sidecar makes itself (rendered by wire/responses.py)."""
    return json.dumps({
        "error": error.kind, "message": error.message, "route": route, "retryable": error.retryable,
        "attempts": attempts,
    }).encode()
