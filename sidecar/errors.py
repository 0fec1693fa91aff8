"""Every error the sidecar answers for itself, and the one place that turns them into responses.

    SidecarError                   a response the sidecar makes itself
    +-- NoRoute                    404 no_route: nothing matches; never forwarded
    +-- CallerError                the caller's request is at fault
    |   +-- BadRequest             400 bad_request: e.g. a malformed x-sidecar-* header
    |   +-- RequestBodyTimeout     408 request_timeout: the body went silent for `timeouts.idle`
    |   +-- CallerGone             499 caller_gone: the caller hung up mid-body (nobody reads this answer)
    +-- UpstreamError              the upstream could not give us a response
        +-- ConnectFailure         502 connect_failure: TCP connect refused or timed out (provably unsent)
        +-- UpstreamReset          502 upstream_reset: connection dropped before response headers
        +-- BadUpstreamResponse    502 bad_upstream_response: the upstream spoke broken HTTP
        +-- UpstreamTimeout        504 timeout: per-try or total deadline passed before headers

Upstream responses, 5xx included, are not errors here: they pass through untouched.
Foreign exceptions (aiohttp, asyncio) are mapped to these at the edge, in `forward.py`.
Callers tell our answers from the upstream's by the `x-sidecar-error` header.
"""

from __future__ import annotations

import json

from aiohttp import web

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


class RequestBodyTimeout(CallerError):
    kind = "request_timeout"
    status = 408


class CallerGone(CallerError):
    kind = "caller_gone"
    status = 499


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


def error_response(
    error: SidecarError, route: str | None, request_id: str, attempts: int = 0, extra: dict[str, str] | None = None
) -> web.Response:
    """The JSON body and headers of every response the sidecar makes itself."""
    body = {
        "error": error.kind, "message": error.message, "route": route, "retryable": error.retryable,
        "attempts": attempts,
    }
    headers = {ERROR_HEADER: error.kind, "X-Request-Id": request_id, **(extra or {})}
    return web.Response(
        status=error.status, body=json.dumps(body).encode(), content_type="application/json", headers=headers
    )
