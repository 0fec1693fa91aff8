"""The upstream HTTP/1.1 client: pooled keep-alive connections, one request at a time on each.

This is the network edge of a request: foreign exceptions (aiohttp's, OSError) become
sidecar errors here, with `raise ... from`.

Why not `aiohttp.ClientSession`: on the benchmark it costs about 75 us of CPU per
request, the whole per-request budget of issue #8. This client keeps aiohttp's own
protocol and llhttp response parser (`ResponseHandler`) and its body writer
(`StreamWriter`), and replaces only the orchestration around them:
  - the request head is built as one string from headers the proxy already cleaned,
    and sent with a bodiless or buffered request in one write;
  - connections are pooled per endpoint, most recently used first, and dropped after the
    endpoint's `keepalive` seconds idle (or less, when the upstream's `Keep-Alive: timeout=N`
    says it closes sooner), below the idle timeout of common upstream servers;
  - a connection goes back to the pool only when its response ended exactly: nothing more
    buffered or half-parsed, and no byte arriving while no request is in flight (a late
    response or a `408` on an idle connection closes it, counted), so no caller can ever read
    another exchange's bytes;
  - nothing is retried here (aiohttp's session resends idempotent requests on a dead
    pooled connection): attempts are the retry layer's, counted there.
`ResponseHandler` is not in aiohttp's documented API, so pyproject.toml pins aiohttp's
minor version; the whole test suite runs through this module.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from typing import Protocol

from aiohttp import ClientConnectionError, ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError, RawResponseMessage, StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Endpoint
from sidecar.errors import BadRequest, BadUpstreamResponse, ConnectFailure, SidecarError, UpstreamReset
from sidecar.wire.body import Body, CallerBody
from sidecar.wire.headers import encode_head

# Methods whose requests are expected to carry a body: without one they say Content-Length: 0
# (as aiohttp's client did), because some servers answer 411 otherwise.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# A pooled connection idle for longer than this may be one the upstream is closing right now:
# look for its EOF in the socket before reusing it (one recv, only for such connections).
PEEK_AFTER_IDLE = 0.25
# An endpoint that sent bytes nobody asked for (a late second response, a 408 on an idle
# connection, bytes past a response's end) gets no connection reused for this long: when such
# bytes can arrive at any moment, some will land while a request is in flight and be read as its
# answer, which no HTTP/1.1 client can tell apart. A fresh connection per request cannot carry
# them to anyone.
DISTRUST_SECONDS = 60.0
# Bytes read from a connection whose request body failed to send, looking for the answer that
# the upstream sent before it closed (an early 401 or 413 to an upload it did not read).
SALVAGE_LIMIT = 1 << 20


class ConnectionCounters(Protocol):
    """Where the client reports what it did to connections (the metrics implement it)."""

    def stale(self, endpoint: str) -> None:
        """A request on a reused connection met the upstream closing it (an idle-timeout race)."""

    def unsolicited(self, endpoint: str) -> None:
        """Bytes arrived while no request was in flight, or past a response's end: closed."""


class Connection(ResponseHandler):
    """aiohttp's client protocol with the pooling rules: bytes nobody asked for close it."""

    head_only: bool | None = None  # None: no parser yet, or one that must not be reused
    in_flight = False  # a request was sent and its response is not complete yet

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Pool) -> None:
        super().__init__(loop)
        self.pool = pool  # its endpoint's: where it goes back to, told when the endpoint misbehaves

    def data_received(self, data: bytes) -> None:
        if data and not self.in_flight:
            # A late second response, a 408 before an idle close, garbage: never let the next
            # request on this connection read it as its own answer.
            self.misbehaved()
            return
        super().data_received(data)

    def misbehaved(self) -> None:
        """Bytes nobody asked for: close this connection, count it, distrust the endpoint."""
        pool = self.pool
        if pool.counters is not None:
            pool.counters.unsolicited(pool.endpoint.base)
        pool.distrust(self._loop.time() + DISTRUST_SECONDS)
        self.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self.in_flight and self.transport is not None:
            self._salvage(self.transport)
        super().connection_lost(exc)

    def _salvage(self, transport: asyncio.BaseTransport) -> None:
        """A write failed (the upstream closed while we sent the body): read what it answered.

        asyncio closes a transport on a failed write without reading what is still in the
        socket, which is where an upstream's early answer (401 to an upload it never read)
        waits. The socket is still open while connection_lost runs (the loop closes it after);
        a descriptor that no longer belongs to this transport (-1) is never read.
        """
        if transport.get_extra_info("sslcontext") is not None:
            return  # the socket holds TLS records, not HTTP: only the TLS layer could read them
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return
        received = 0
        while received < SALVAGE_LIMIT:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EAGAIN: nothing more; ECONNRESET: nothing more to read
                return
            if not data:
                return
            received += len(data)
            super().data_received(data)

    def holds_more(self) -> bool:
        """Whether bytes arrived past the end of the response just read: a queued message,
        unparsed bytes, or the start of another message inside the parser. (feed_eof on a
        parser between two messages does nothing; on one holding a partial message it returns
        or raises.)"""
        if self._buffer or self._tail:
            return True
        parser = self._parser
        try:
            return parser is not None and parser.feed_eof() is not None
        except Exception:  # noqa: BLE001 - whatever it holds, it is not a clean boundary
            return True

    def shows_eof(self) -> bool:
        """Whether the upstream closed this idle connection, seen in its socket before the loop
        reports it. One non-blocking peek; any other answer means the connection looks alive."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.fileno() < 0:
            return True
        peek = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            peek.detach()  # the descriptor stays the transport's


class Pool:
    """An endpoint's idle connections, oldest on the left, each with the loop times it expires
    and it became idle."""

    __slots__ = ("counters", "distrusted_until", "endpoint", "idle")

    def __init__(self, endpoint: Endpoint, counters: ConnectionCounters | None) -> None:
        self.endpoint = endpoint
        self.counters = counters
        self.idle: deque[tuple[Connection, float, float]] = deque()
        self.distrusted_until = 0.0  # loop time; until then no connection goes back

    def distrust(self, until: float) -> None:
        self.distrusted_until = until
        while self.idle:  # they may hold the same kind of bytes, not yet arrived
            self.idle.pop()[0].abort()


class UpstreamResponse:
    """An upstream's response with its headers read and its body still on the wire."""

    __slots__ = ("_chunked", "_client", "_connection", "_sending", "content", "headers", "reason", "status")

    def __init__(
        self, message: RawResponseMessage, content: StreamReader, connection: Connection,
        sending: asyncio.Task[None] | None, client: UpstreamClient,
    ) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self._chunked: bool = message.chunked
        self._connection = connection
        self._sending = sending
        self._client = client

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the exchange ended cleanly."""
        connection = self._connection
        sending, self._sending = self._sending, None
        if sending is not None and (not sending.done() or sending.cancelled() or sending.exception()):
            # The upstream answered before taking the whole body, or the body failed on the
            # way: the request's framing on this connection is unfinished.
            sending.cancel()
            connection.abort()
        elif not (connection.is_connected() and self.content.is_eof()):
            connection.abort()  # body unread or broken: the connection's framing is unknown
        elif connection.holds_more():
            connection.misbehaved()  # bytes past the response's end: they must reach nobody
        elif connection.should_close:  # Connection: close, or the parser failed
            connection.close()
        else:
            if self._chunked:
                # llhttp keeps the last trailer field it saw and hands it to the next message
                # as a header: a chunked response's parser is never used again.
                connection.head_only = None
            self._client.give_back(connection, self.headers)

    def detach(self) -> Connection:
        """Hand the connection over for good (a WebSocket tunnel after `101`): never pooled again."""
        return self._connection

    def close(self) -> None:
        """Drop the connection at once (the caller left, or the body broke)."""
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        self._connection.abort()


class UpstreamClient:
    """One per process; pools are keyed by endpoint (host, port, tls)."""

    def __init__(self, max_line: int, max_field: int, counters: ConnectionCounters | None = None) -> None:
        self._counters = counters
        self._max_line = max_line
        self._max_field = max_field
        self._loop = asyncio.get_running_loop()
        self._idle: dict[Endpoint, Pool] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None  # made on first use: most sidecars never need it

    async def send(
        self, endpoint: Endpoint, method: str, target: str, headers: CIMultiDict[str], body: Body,
        connect_timeout: float,
    ) -> UpstreamResponse:
        """Send one request and wait for the response headers. Raises only SidecarErrors."""
        head = _request_head(method, endpoint.path + target, headers, body)
        pool = self._idle.get(endpoint)
        if pool is None:
            pool = self._idle[endpoint] = Pool(endpoint, self._counters)
        connection = self._pooled(pool)  # not `or`: a Connection is a queue, falsy when empty
        reused = connection is not None
        if connection is None:
            connection = await self._connect(pool, connect_timeout)
        connection.in_flight = True
        head_only = method == "HEAD"
        if connection.head_only is not head_only:
            # A new parser only when the connection's is missing or of the other kind: HEAD's
            # response has no body whatever it declares. (aiohttp makes one per request; the
            # llhttp parser reads any number of messages in a row.)
            connection.set_response_params(
                skip_payload=head_only, read_until_eof=True, auto_decompress=False,
                max_line_size=self._max_line, max_field_size=self._max_field,
            )
            connection.head_only = head_only
        transport = connection.transport
        assert transport is not None  # connected just now, or checked when taken from the pool
        sending: asyncio.Task[None] | None = None
        try:
            if isinstance(body, CallerBody):
                transport.write(head)
                sending = self._loop.create_task(_send_body(connection, self._loop, body, "Content-Length" in headers))
                sending.add_done_callback(_retrieve)
                message, payload = await _response_head(connection, sending, endpoint.authority)
            else:
                transport.write(head + body if body else head)  # head and small body in one segment
                message, payload = await _response_head(connection, None, endpoint.authority)
        except BaseException as exc:
            if sending is not None:
                sending.cancel()
            connection.abort()  # whatever happened, this connection's state is unknown
            if reused and isinstance(exc, UpstreamReset) and self._counters is not None:
                self._counters.stale(endpoint.base)
            raise
        return UpstreamResponse(message, payload, connection, sending, self)

    def give_back(self, connection: Connection, headers: CIMultiDictProxy[str]) -> None:
        """A connection whose exchange ended exactly, ready for the next request."""
        pool = connection.pool
        idle_for = pool.endpoint.keepalive
        if (says := headers.get("Keep-Alive")) is not None:
            idle_for = min(idle_for, _keep_alive_limit(says))
        now = self._loop.time()
        if idle_for <= 0 or now < pool.distrusted_until:
            connection.close()
            return
        connection.in_flight = False
        pool.idle.append((connection, now + idle_for, now))
        if self._sweep is None:
            self._sweep = self._loop.call_later(idle_for, self._sweep_idle)

    def _close_expired_in(self, pool: Pool, now: float) -> None:
        idle = pool.idle
        while idle and idle[0][1] <= now:  # the oldest are on the left
            idle.popleft()[0].close()

    def _sweep_idle(self) -> None:
        """Close connections idle past their time even when no request comes to notice them."""
        self._sweep = None
        now = self._loop.time()
        soonest = None
        for pool in self._idle.values():
            self._close_expired_in(pool, now)
            if pool.idle:
                first = min(expiry for _, expiry, _ in pool.idle)
                soonest = first if soonest is None else min(soonest, first)
        if soonest is not None:
            self._sweep = self._loop.call_at(soonest, self._sweep_idle)

    def _pooled(self, pool: Pool) -> Connection | None:
        idle = pool.idle
        if not idle:
            return None
        now = self._loop.time()
        self._close_expired_in(pool, now)
        while idle:
            connection, expiry, since = idle.pop()  # the most recently used: least likely to be closing
            if expiry <= now or not connection.is_connected():
                connection.abort()
            elif now - since > PEEK_AFTER_IDLE and connection.shows_eof():
                connection.abort()  # its EOF is in the socket; the loop has not seen it yet
            else:
                return connection
        return None

    async def _connect(self, pool: Pool, within: float) -> Connection:
        endpoint = pool.endpoint
        connection = Connection(self._loop, pool)
        tls = self._tls_context() if endpoint.tls else None
        try:
            async with asyncio.timeout(within):
                await self._loop.create_connection(
                    lambda: connection, endpoint.host, endpoint.port, ssl=tls,
                    server_hostname=endpoint.host if tls else None,
                )
        except TimeoutError as exc:
            raise ConnectFailure(f"connect to {endpoint.authority} timed out after {within:g}s") from exc
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS handshake
            raise ConnectFailure(f"cannot connect to {endpoint.authority}: {exc.strerror or exc}") from exc
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def close(self) -> None:
        """Close the idle connections (those in use are closed by their responses)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for pool in self._idle.values():
            for connection, _, _ in pool.idle:
                connection.close()
        self._idle.clear()


def _keep_alive_limit(value: str) -> float:
    """How long we may keep a connection idle, given the upstream's `Keep-Alive: timeout=N`:
    a margin below N (a second, or half of N when N is small), since its clock started first."""
    for param in value.split(","):
        name, _, number = param.partition("=")
        if name.strip().lower() == "timeout":
            try:
                seconds = float(number.strip())
            except ValueError:
                return float("inf")
            return max(seconds - 1.0, seconds / 2) if seconds > 0 else 0.0
    return float("inf")


def _request_head(method: str, target: str, headers: CIMultiDict[str], body: Body) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    if "Content-Length" not in headers:
        if isinstance(body, CallerBody):
            lines.append("Transfer-Encoding: chunked\r\n")
        elif body or method in BODY_METHODS:
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    head = encode_head(lines)
    if head is None:
        raise BadRequest("a request header holds a line break")
    return head


async def _send_body(connection: Connection, loop: asyncio.AbstractEventLoop, body: CallerBody,
                     sized: bool) -> None:
    writer = StreamWriter(connection, loop)
    if not sized:
        writer.enable_chunking()
    async for chunk in body:
        await writer.write(chunk)  # waits while the upstream's socket buffer is full
    await writer.write_eof()


Head = tuple[RawResponseMessage, StreamReader]


async def _response_head(connection: Connection, sending: asyncio.Task[None] | None, authority: str) -> Head:
    """The first final response (1xx interim responses are skipped), errors mapped to ours."""
    try:
        while True:
            if sending is None:
                message, payload = await connection.read()
            else:
                message, payload = await _read_while_sending(connection, sending)
            if not 100 <= message.code < 200 or message.code == 101:
                return message, payload
    except SidecarError:
        raise
    except ServerDisconnectedError as exc:
        raise UpstreamReset(f"{authority} closed the connection before response headers") from exc
    except HttpProcessingError as exc:
        raise BadUpstreamResponse(f"{authority} sent an invalid response: {exc.message}") from exc
    except (ClientConnectionError, OSError) as exc:
        raise UpstreamReset(f"the connection to {authority} failed: {exc}") from exc


async def _read_while_sending(connection: Connection, sending: asyncio.Task[None]) -> Head:
    """Wait for response headers while the body streams; a failure of the caller's body wins."""
    reading = asyncio.ensure_future(connection.read())
    try:
        await asyncio.wait((reading, sending), return_when=asyncio.FIRST_COMPLETED)
        if not reading.done() and sending.done() and not sending.cancelled():
            failure = sending.exception()
            if isinstance(failure, SidecarError):
                raise failure  # the caller stalled, left or sent too much
        return await reading
    finally:
        reading.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    # A body that fails after the response has arrived is reported by the response's end;
    # reading the exception here keeps asyncio from logging it as never retrieved.
    if not task.cancelled():
        task.exception()
