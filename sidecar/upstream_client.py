"""The upstream HTTP/1.1 client: pooled keep-alive connections, one request at a time on each.

This is the network edge of a request: foreign exceptions (aiohttp's, OSError) become
sidecar errors here, with `raise ... from`.

Why not `aiohttp.ClientSession`: on the benchmark it costs about 75 us of CPU per
request, the whole per-request budget of issue #8. This client keeps aiohttp's own
protocol and llhttp response parser (`ResponseHandler`) and its body writer
(`StreamWriter`), and replaces only the orchestration around them:
  - the request head is built as one string from headers the proxy already cleaned,
    and sent with a bodiless or buffered request in one write;
  - connections are pooled per endpoint, most recently used first, and dropped after
    `keepalive` seconds idle, below the idle timeout of common upstream servers;
  - nothing is retried here (aiohttp's session resends idempotent requests on a dead
    pooled connection): attempts are the retry layer's, counted there.
`ResponseHandler` is not in aiohttp's documented API, so pyproject.toml pins aiohttp's
minor version; the whole test suite runs through this module.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from aiohttp import ClientConnectionError, ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError, RawResponseMessage, StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.body import Body, CallerBody
from sidecar.config import Endpoint
from sidecar.errors import BadRequest, BadUpstreamResponse, ConnectFailure, SidecarError, UpstreamReset
from sidecar.headers import encode_head

# Methods whose requests are expected to carry a body: without one they say Content-Length: 0
# (as aiohttp's client did), because some servers answer 411 otherwise.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Connection(ResponseHandler):
    """aiohttp's client protocol, remembering which kind of response parser it has."""

    head_only: bool | None = None  # None: no parser yet


# An endpoint's idle connections with the loop time each became idle, oldest on the left.
Pool = deque[tuple[Connection, float]]


class UpstreamResponse:
    """An upstream's response with its headers read and its body still on the wire."""

    __slots__ = ("_client", "_connection", "_pool", "_sending", "content", "headers", "reason", "status")

    def __init__(
        self, message: RawResponseMessage, content: StreamReader, connection: Connection,
        sending: asyncio.Task[None] | None, client: UpstreamClient, pool: Pool,
    ) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self._connection = connection
        self._sending = sending
        self._client = client
        self._pool = pool  # where the connection goes back to

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the exchange ended cleanly."""
        connection = self._connection
        sending, self._sending = self._sending, None
        if sending is not None and (not sending.done() or sending.cancelled() or sending.exception()):
            # The upstream answered before taking the whole body, or the body failed on the
            # way: the request's framing on this connection is unfinished.
            sending.cancel()
            connection.abort()
        elif connection.is_connected() and self.content.is_eof() and not connection.should_close:
            self._client.give_back(self._pool, connection)
        else:
            connection.close()  # body unread or broken: the connection's framing is unknown

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

    def __init__(self, keepalive: float, max_line: int, max_field: int) -> None:
        self._keepalive = keepalive
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
            pool = self._idle[endpoint] = deque()
        connection = self._pooled(pool)  # not `or`: a Connection is a queue, falsy when empty
        if connection is None:
            connection = await self._connect(endpoint, connect_timeout)
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
        except BaseException:
            if sending is not None:
                sending.cancel()
            connection.abort()  # whatever happened, this connection's state is unknown
            raise
        return UpstreamResponse(message, payload, connection, sending, self, pool)

    def give_back(self, pool: Pool, connection: Connection) -> None:
        """A connection whose exchange ended cleanly, ready for the next request."""
        pool.append((connection, self._loop.time()))
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._keepalive, self._sweep_idle)

    def _close_expired_in(self, pool: Pool) -> None:
        too_old = self._loop.time() - self._keepalive
        while pool and pool[0][1] <= too_old:  # the oldest are on the left
            pool.popleft()[0].close()

    def _sweep_idle(self) -> None:
        """Close connections idle past keepalive even when no request comes to notice them."""
        self._sweep = None
        for pool in self._idle.values():
            self._close_expired_in(pool)
        if any(self._idle.values()):
            self._sweep = self._loop.call_later(self._keepalive, self._sweep_idle)

    def _pooled(self, pool: Pool) -> Connection | None:
        if not pool:
            return None
        self._close_expired_in(pool)
        while pool:
            connection = pool.pop()[0]  # the most recently used: least likely to be closing
            if connection.is_connected():
                return connection
        return None

    async def _connect(self, endpoint: Endpoint, within: float) -> Connection:
        connection = Connection(self._loop)
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
        for idle in self._idle.values():
            for connection, _ in idle:
                connection.close()
        self._idle.clear()


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
