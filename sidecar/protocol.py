"""The traffic listeners' HTTP/1.1 server: aiohttp's parser and protocol, hardened.

- A request aiohttp cannot parse (smuggling shapes such as Content-Length with
  Transfer-Encoding, bad chunk sizes, obs-fold, bare LF, missing or duplicate Host)
  gets a JSON 400 and the connection is closed, because its framing is in doubt.
  Over-long request lines get 414 and over-large or too many headers 431. Nothing is
  echoed back and no traceback is logged.
- Header-read timeout: a connection that starts a request must finish its headers
  within `server.header_timeout`, or it is closed (slowloris).
- `server.listen_max_connections` caps open client connections per listener; a
  connection over the cap gets 503 and is closed at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from sidecar.config.schema import Server


def _error(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"error": kind, "message": message, "route": None, "retryable": False, "attempts": 0})
    reason = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large",
              503: "Service Unavailable"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"x-sidecar-error: {kind}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


class GuardedHandler(RequestHandler):
    """One client connection."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, GuardedServer)
        if len(manager.connections) > self._limits.listen_max_connections:
            assert isinstance(transport, asyncio.Transport)
            transport.write(_error(503, "overloaded", "the sidecar has too many client connections"))
            self.force_close()
            transport.close()
            return
        self._start_header_timer()

    def _start_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._limits.header_timeout, self._headers_too_slow,
                                                   self._request_count)

    def _headers_too_slow(self, count: int) -> None:
        self._header_timer = None
        if self._request_count == count and not self._request_in_progress and self.transport is not None:
            self.force_close()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            if self._header_timer is not None:  # the headers are complete
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None and not self._request_in_progress and not self._messages:
            self._start_header_timer()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def close_without_lingering(self) -> None:
        """Close once the current answer is out, without first reading what is left of the
        request body (aiohttp lingers up to 10 s for it): for a caller whose body went silent."""
        self._lingering_time = 0.0
        self.close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            # The request line is checked against server.max_request_line by the proxy (414); the
            # parser's own cap on it is a hard backstop and reports the line as a bytearray.
            if exc.args and isinstance(exc.args[0], bytearray):
                status, kind, text = (414, "uri_too_long", "the request line is too long")
            else:
                status, kind, text = (431, "header_too_large", "a request header is too large")
        elif "Too many headers" in str(exc):
            status, kind, text = (431, "header_too_large", "the request has too many headers")
        else:
            kind, text = "bad_request", "the request is not valid HTTP/1.1 (its framing is in doubt)"
        response = web.Response(status=status, body=_error(status, kind, text).split(b"\r\n\r\n", 1)[1],
                                content_type="application/json", headers={"x-sidecar-error": kind})
        response.force_close()
        return response


class GuardedServer(web.Server):
    def __init__(self, handler: Any, limits: Server, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)
