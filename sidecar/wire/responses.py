"""The one renderer of responses the sidecar makes itself: its errors and a route's fallback."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from sidecar.config.schema import Fallback
from sidecar.errors import ERROR_HEADER, CircuitOpen, Shed, SidecarError, error_document


def error_response(
    error: SidecarError,
    route: str | None,
    request_id: str,
    attempts: int = 0,
    extra: dict[str, str] | None = None,
    fallback: Fallback | None = None,
) -> web.Response:
    """The JSON body and headers of every response the sidecar makes itself.

    While a route sheds load (breaker open, overloaded) its configured fallback is
    served instead of the JSON body; `x-sidecar-error` still says what happened.
    """
    headers = {ERROR_HEADER: error.kind, "X-Request-Id": request_id, **(extra or {})}
    if isinstance(error, CircuitOpen):
        headers["Retry-After"] = str(error.retry_after)
    if fallback is not None and isinstance(error, Shed):
        headers = {**fallback.headers, **headers}
        return web.Response(status=fallback.status, body=fallback.body.encode(), headers=headers)
    return web.Response(
        status=error.status, body=error_document(error, route, attempts), content_type="application/json",
        headers=headers,
    )


def refusal_response(error: SidecarError) -> web.Response:
    """A request refused before it had a route (its framing or version in doubt): the connection closes."""
    response = web.Response(
        status=error.status, body=error_document(error, None), content_type="application/json",
        headers={ERROR_HEADER: error.kind},
    )
    response.force_close()
    return response


def raw_refusal(error: SidecarError) -> bytes:
    """The same answer as bytes, for a connection refused before aiohttp's request machinery runs."""
    body = error_document(error, None)
    return (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{ERROR_HEADER}: {error.kind}\r\nConnection: close\r\n\r\n"
    ).encode() + body
