"""The traffic listeners' HTTP/1.1 server: aiohttp's parser and protocol, hardened.

- A request aiohttp cannot parse (smuggling shapes such as Content-Length with
  Transfer-Encoding, bad chunk sizes, obs-fold, bare LF, missing or duplicate Host)
  gets a JSON 400 and the connection is closed, because its framing is in doubt.
  Over-long request lines get 414 and over-large or too many headers 431. Nothing is
  echoed back and no traceback is logged.
- A request line whose version is not HTTP/1.0 or 1.1 gets 505 (HTTP/2.0 and later) or
  400 (no version: HTTP/0.9), and the connection is closed: nothing is forwarded, and no
  answer repeats a version the sidecar does not speak. Our answers to requests that did
  not parse say HTTP/1.1 (aiohttp's would say HTTP/1.0).
- `server.underscore_headers: drop` removes header names with `_` as the request is parsed,
  so nothing after sees them (`reject` is in request_checks.py).
- Header-read timeout: a connection that starts a request must finish its headers
  within `server.header_timeout`, or it is closed (slowloris).
- `server.listen_max_connections` caps open client connections per listener; a
  connection over the cap gets 503 and is closed at once.
- Early answers: when the server has an `early_answer` (a listener with cached routes), a
  plain request that arrives while the connection is idle is offered to it as soon as it is
  parsed, before aiohttp makes a request object and a task of it. What it answers (a fresh
  cache hit) is written at once; anything it declines, and everything after that on the
  connection, takes the usual path, in order. Only a bodiless HTTP/1.1 keep-alive request that
  upgrades nothing, on a connection whose caller has taken every byte sent so far, is offered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config.schema import Server
from sidecar.errors import (
    BadRequest,
    CallerError,
    HeaderTooLarge,
    HttpVersionNotSupported,
    Overloaded,
    SidecarError,
    UriTooLong,
)
from sidecar.wire.responses import raw_refusal, refusal_response

log = logging.getLogger("sidecar.server")

_HTTP1 = (HttpVersion11, HttpVersion10)
_HTTP09 = HttpVersion(0, 9)

# (method, raw path and query, headers) -> the whole answer's bytes, or None to decline (the
# request then takes the usual path). Called synchronously from data_received: it must not block.
EarlyAnswer = Callable[[str, str, CIMultiDictProxy[str]], bytes | None]


class _Refused(Exception):
    """A message that parsed but is refused before it becomes a request (see `_screen`)."""

    def __init__(self, error: CallerError) -> None:
        super().__init__(error.message)
        self.error = error


def _refused_version(version: HttpVersion) -> _ErrInfo:
    if version == _HTTP09:  # what the C parser makes of a request line without a version
        error: CallerError = BadRequest("the request line has no HTTP/1.x version (HTTP/0.9 is not supported)")
    else:
        error = HttpVersionNotSupported(f"HTTP/{version.major}.{version.minor} is not supported: use HTTP/1.1")
    return _ErrInfo(status=error.status, exc=_Refused(error), message=error.message)


def _without_underscored(message: RawRequestMessage) -> RawRequestMessage:
    headers = CIMultiDict((name, value) for name, value in message.headers.items() if "_" not in name)
    raw = tuple((name, value) for name, value in message.raw_headers if b"_" not in name)
    return message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw)


class GuardedHandler(RequestHandler):
    """One client connection."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guarded = manager  # its limits follow a reload
        self._limits = manager.limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        assert isinstance(manager, GuardedServer)
        if len(manager.connections) > self._limits.listen_max_connections:
            stream = cast(asyncio.Transport, transport)  # uvloop's is one, without subclassing it
            stream.write(raw_refusal(Overloaded("the sidecar has too many client connections", "connections")))
            self.force_close()
            stream.close()
            return
        self._start_header_timer()

    def _start_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._limits.header_timeout, self._headers_too_slow,
                                                   self._request_count)

    def _headers_too_slow(self, count: int) -> None:
        self._header_timer = None
        if self._request_count == count and not self._request_in_progress and self.transport is not None:
            self.force_close()  # closes the transport, and sets self.transport to None

    def data_received(self, data: bytes) -> None:
        before, queued_before = self._request_count, len(self._messages)
        early = self._guarded.early_answer
        if early is not None and self._idle():
            self._receive_answering_early(data, early)
        else:
            super().data_received(data)
        if self._request_count > before:
            if self._header_timer is not None:  # the headers are complete
                self._header_timer.cancel()
                self._header_timer = None
            if (queued := len(self._messages) - queued_before) > 0:
                # The usual case, one HTTP/1.1 request (the parser hands out one version object),
                # skips the screen's loop: this runs for every request.
                last = self._messages[-1][0]
                usual = queued == 1 and not isinstance(last, _ErrInfo) and last.version is HttpVersion11
                if not usual or self._drops_underscored():
                    self._screen(queued)
        elif self._header_timer is None and not self._request_in_progress and not self._messages:
            self._start_header_timer()  # the first bytes of the next request on a kept-alive connection

    def _idle(self) -> bool:
        """Whether aiohttp's request loop waits for a request, with nothing queued or in progress;
        or has not begun yet on a new connection (its task runs after connection_made, and with
        uvloop the first request can arrive before it does): it will find nothing and wait."""
        waiter = self._waiter
        if self._request_count:
            waiting = waiter is not None and not waiter.done()
        else:
            waiting = waiter is None or not waiter.done()
        return (
            waiting and not self._messages and self._payload_parser is None and not self._request_in_progress
            and not self._upgraded and not self._force_close and not self._close and self.transport is not None
        )

    def _receive_answering_early(self, data: bytes, early: EarlyAnswer) -> None:
        """aiohttp's data_received for an idle connection, with each request just parsed offered
        to `early` first, in order, until one is declined: that one and all after it are queued
        for aiohttp's request loop exactly as aiohttp queues them."""
        parser = self._parser
        transport = self.transport
        assert parser is not None and transport is not None  # _idle() said so
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages, upgraded, tail = [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)], False, b""
        answered = 0
        if not upgraded:
            for message, payload in messages:
                if not self._offered(message, payload, transport):
                    break
                try:
                    answer = early(message.method, message.path, message.headers)
                except Exception:  # a bug there must not cost the caller: the usual path answers
                    log.exception("an early answer failed; the request takes the usual path")
                    answer = None
                if answer is None:
                    break
                transport.write(answer)
                self._request_count += 1
                parser.message_consumed()
                answered += 1
            if answered:
                self._answered_early(answered, transport)
        rest = messages[answered:] if answered else messages
        for message, payload in rest:
            self._request_count += 1
            self._messages.append((message, payload))
        waiter = self._waiter
        if rest and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail

    def _offered(self, message: Any, payload: Any, transport: asyncio.Transport) -> bool:
        """Whether a parsed request may be offered to the early answer: bodiless HTTP/1.1,
        keep-alive, no upgrade, nothing for _screen to do, and the caller keeping up."""
        return (
            payload is EMPTY_PAYLOAD and not isinstance(message, _ErrInfo) and message.version == HttpVersion11
            and not message.should_close and not message.upgrade and not transport.get_write_buffer_size()
            and not (self._drops_underscored() and any("_" in name for name in message.headers))
        )

    def _answered_early(self, count: int, transport: asyncio.Transport) -> None:
        """What aiohttp's request loop does after answers it made itself: count them, and push
        the keep-alive deadline on (an idle connection is closed keepalive_timeout after its
        last answer). An answer the kernel did not take at once is watched like relay.py's."""
        manager = self._manager
        assert manager is not None
        manager.requests_count += count
        self._keepalive = True
        if self._keepalive_timeout > 0:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
        if (waiting := transport.get_write_buffer_size()) and self._send_watch is None:
            self._watch_send(waiting)

    def _watch_send(self, waiting: int) -> None:
        """A caller that takes none of an early answer for server.send_timeout is disconnected
        (relay.py's rule): otherwise it would hold the answer in memory as long as it likes."""
        self._send_watch = self._loop.call_later(self._guarded.limits.send_timeout, self._sent_or_stuck, waiting)

    def _sent_or_stuck(self, waiting_before: int) -> None:
        self._send_watch = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._request_in_progress or self._messages:
            return  # gone, or the usual path has the connection now, with its own watch
        if not (waiting := transport.get_write_buffer_size()):
            return
        if waiting < waiting_before:
            self._watch_send(waiting)  # it is taking bytes, slowly
            return
        log.debug("a caller took nothing of an early answer for %gs: disconnected", self._guarded.limits.send_timeout)
        transport.abort()

    def _drops_underscored(self) -> bool:
        return self._guarded.limits.underscore_headers == "drop"

    def _screen(self, count: int) -> None:
        """Check the `count` messages just parsed (the queue's last ones) before they become requests.

        A refused one is replaced by a parse error, so aiohttp answers it through
        `handle_error` and closes the connection; its body is never read.
        """
        messages = self._messages
        drop_underscored = self._drops_underscored()
        for index in range(len(messages) - count, len(messages)):
            message, payload = messages[index]
            if isinstance(message, _ErrInfo):
                continue
            if message.version not in _HTTP1:
                messages[index] = (_refused_version(message.version), EMPTY_PAYLOAD)
            elif drop_underscored and any("_" in name for name in message.headers):
                messages[index] = (_without_underscored(message), payload)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._send_watch is not None:
            self._send_watch.cancel()
            self._send_watch = None
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
        error: SidecarError
        if isinstance(exc, _Refused):
            error = exc.error
        elif status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        elif isinstance(exc, LineTooLong):
            # The request line is checked against server.max_request_line by the proxy (414); the
            # parser's own cap on it is a hard backstop and reports the line as a bytearray.
            if exc.args and isinstance(exc.args[0], bytearray):
                error = UriTooLong("the request line is too long")
            else:
                error = HeaderTooLarge("a request header is too large")
        elif "Too many headers" in str(exc):
            error = HeaderTooLarge("the request has too many headers")
        elif isinstance(exc, BadStatusLine) and "Invalid HTTP version" in str(exc):
            # The C parser's word for a well-formed HTTP/d.d it does not know (HTTP/3.0);
            # the pure-Python parser passes those on to _screen.
            error = HttpVersionNotSupported("the request line's HTTP version is not supported: use HTTP/1.1")
        else:
            error = BadRequest("the request is not valid HTTP/1.1 (its framing is in doubt)")
        # The request is aiohttp's stand-in for a message that did not parse, and it says
        # HTTP/1.0; the status line is written in the request's version.
        request._version = HttpVersion11
        request._cache.pop("version", None)
        return refusal_response(error)


class GuardedServer(web.Server):
    def __init__(self, handler: Any, limits: Server, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        # Offered each plain request of an idle connection before aiohttp sees it (see the
        # module docstring); None costs nothing. Set and changed by the runtime.
        self.early_answer: EarlyAnswer | None = None

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)
