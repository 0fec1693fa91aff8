"""The upgrade tunnel: a WebSocket handshake goes through the route's stack, then raw bytes pass both ways.

The handshake is an ordinary request as far as the policy layers go: it takes a concurrency
slot (held until the tunnel ends), passes the breaker, and per_try/total bound the wait for the
upstream's `101 Switching Protocols`; it is retried only when the connect failed (retry.py).
Any other answer (426, 403, 503, ...) is relayed as usual and nothing is tunnelled.

After a 101 the two sockets are joined here, without aiohttp's server or client protocols in
between: each transport gets a `_Side` protocol whose `data_received` writes straight to the
other transport. Nothing is buffered beyond the kernel and asyncio's write buffer: when one
side's write buffer is full (`pause_writing`) the other side stops being read until it drains.
Why the transports are taken over rather than fed through aiohttp's upgraded-mode parsers: the
server's protocol drops every byte a caller sends once a shutdown has begun (`_close`), which
would corrupt a tunnel for the whole of `shutdown.timeout`.

The tunnel ends when either side closes (the other is closed after its queued bytes are written),
when no byte moved either way for `timeouts.idle` (both are cut), or when a shutdown's
`shutdown.timeout` is over (`Tunnels.go_away`): then each peer whose direction is at a frame
boundary is sent a close frame 1001 (going away) first. Frame boundaries are tracked by reading
frame headers as the bytes pass (`_Frames`), never by buffering a frame.

The upstream connection is never pooled again; the caller's connection is closed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import BadRequest
from sidecar.wire.headers import REQUEST_ID, downstream_fields, dropped_names, encode_head
from sidecar.wire.upstream_client import UpstreamResponse
from sidecar.wire.whole_response import SentResponse

log = logging.getLogger("sidecar.websocket")

# RFC 6455 5.5.1: a close frame carrying status 1001 (going away). Towards the caller it is a
# server's frame (unmasked); towards the upstream a client's, which must be masked (_to_upstream).
GOING_AWAY = b"\x03\xe9"
GOING_AWAY_TO_CALLER = b"\x88\x02" + GOING_AWAY
# A side that closes flushes what is queued for it first; one that does not read it is cut after this.
FLUSH_GRACE = 2.0
_HTTP11 = (1, 1)


class TunnelMetrics(Protocol):
    """What a tunnel reports (the route's metrics implement it)."""

    def websocket_opened(self) -> None: ...

    def websocket_closed(self) -> None: ...


def websocket_upgrade(request: web.BaseRequest, allowed: bool, upstream_headers: CIMultiDict[str]) -> bool:
    """Whether `request` opens a WebSocket tunnel; if so, Connection and Upgrade (hop-by-hop, so
    not in `upstream_headers`) are put back for the upstream.

    An upgrade to anything but websocket (h2c, TLS) is ignored, as RFC 9110 7.8 lets a server
    do and Envoy and nginx do: its headers are dropped as hop-by-hop ones and the request goes
    on as plain HTTP/1.1. Refusing it would break every client that offers h2c on http://
    URLs (Java's HttpClient, `curl --http2`) for no gain. On a route with `websocket: false` a
    websocket upgrade is ignored the same way.
    """
    headers = request.headers
    if "Upgrade" not in headers or not _names_upgrade(headers):
        return False  # an Upgrade header that Connection does not name is a plain hop-by-hop header
    protocol = headers["Upgrade"]
    if protocol.strip().lower() != "websocket" or not allowed:
        return False
    if request.method != "GET" or request.version != _HTTP11:
        raise BadRequest("a WebSocket handshake is an HTTP/1.1 GET request")
    if request.body_exists:
        raise BadRequest("a WebSocket handshake has no body")
    upstream_headers["Connection"] = "Upgrade"
    upstream_headers["Upgrade"] = protocol
    return True


def _names_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    return any(
        token.strip().lower() == "upgrade" for value in headers.getall("Connection", ()) for token in value.split(",")
    )


class Tunnels:
    """A listener's open tunnels, so that a shutdown can close them once its time is up."""

    def __init__(self) -> None:
        self.open: set[Tunnel] = set()

    def go_away(self) -> None:
        """Close every open tunnel, each peer told 1001 (going away) where a frame can be written."""
        for tunnel in list(self.open):
            tunnel.go_away()


class _Frames:
    """Where one direction's byte stream stands: between two WebSocket frames, or inside one.

    Only frame headers are read (2 to 14 bytes per frame); a large frame costs one
    subtraction per chunk. `closed`: a close frame went this way.
    """

    __slots__ = ("_head", "_left", "closed")

    def __init__(self) -> None:
        self._left = 0  # bytes of the current frame still to come
        self._head = b""  # the start of a frame header that a chunk cut in two
        self.closed = False

    @property
    def at_boundary(self) -> bool:
        return self._left == 0 and not self._head

    def feed(self, data: bytes) -> None:
        left = self._left
        size = len(data)
        if left >= size:
            self._left = left - size
            return
        position = left
        if self._head:
            data = self._head + data[position:]
            size = len(data)
            position = 0
            self._head = b""
        while position < size:
            if size - position < 2:
                break
            first, second = data[position], data[position + 1]
            length = second & 0x7F
            header = 2 + (4 if second & 0x80 else 0) + (2 if length == 126 else 8 if length == 127 else 0)
            if size - position < header:
                break
            if length == 126:
                length = int.from_bytes(data[position + 2:position + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[position + 2:position + 10], "big")
            if first & 0x0F == 0x8:
                self.closed = True
            end = position + header + length
            if end > size:
                self._left = end - size
                return
            position = end
        self._left = 0
        self._head = data[position:]


class _Side(asyncio.Protocol):
    """One end of the tunnel: what its transport reads is written to the other end's."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, name: str) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.name = name  # "caller" or "upstream": who ended the tunnel when this side closes
        self.frames = _Frames()  # of the bytes this side sends
        self.lost = False
        self.peer: _Side = self

    def data_received(self, data: bytes) -> None:
        self.tunnel.relay(self, data)

    def eof_received(self) -> bool:
        return False  # closes the transport: connection_lost ends the tunnel

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.side_lost(self, exc)

    def pause_writing(self) -> None:
        # This side's write buffer is full: stop reading the side that fills it.
        with contextlib.suppress(RuntimeError):  # uvloop refuses on a closing transport
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.peer.transport.resume_reading()


class _Collector:
    """Takes the bytes aiohttp's protocols buffered after the handshake (they arrive through
    `set_parser`, aiohttp's own hook for an upgraded connection's first bytes)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        return None


class Tunnel:
    """One WebSocket connection after its handshake: `run()` relays until either side ends it."""

    def __init__(
        self, request: web.BaseRequest, upstream: UpstreamResponse, idle: float, metrics: TunnelMetrics,
        tunnels: Tunnels,
    ) -> None:
        self._request = request
        self._upstream = upstream
        self._idle = idle
        self._metrics = metrics
        self._tunnels = tunnels
        self._loop = asyncio.get_running_loop()
        # Wakes run(); `ended_by` says whether the tunnel ended (a cancelled run() cancels the future).
        self._ended: asyncio.Future[None] = self._loop.create_future()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._caller: _Side | None = None
        self._upstream_side: _Side | None = None
        self._handler: asyncio.Task[Any] | None = None
        self._aiohttp_caller: asyncio.BaseProtocol | None = None  # told of the caller's end (_tell_aiohttp)
        self.bytes_in = 0  # relayed from the caller, after the handshake
        self.bytes_out = 0  # relayed to the caller, after the handshake
        self.ended_by = ""  # caller, upstream, idle or shutdown

    async def run(self, request_id: str, extra: dict[str, str]) -> web.StreamResponse:
        """Answer the caller with the upstream's 101 and relay until the tunnel ends."""
        request, upstream = self._request, self._upstream
        caller_transport = request.transport
        connection = upstream.detach()
        head = _switching_head(upstream, request_id, extra)
        if caller_transport is None or caller_transport.is_closing() or head is None:
            connection.abort()
            if caller_transport is not None:
                caller_transport.abort()
            self.ended_by = "caller"
            return SentResponse(101, keep_alive=False)
        # Bytes that came after the handshake, still held by aiohttp's protocols, are taken
        # with no await before the transports are ours, so none can slip past.
        aiohttp_caller = request.protocol
        from_caller, from_upstream = _Collector(), _Collector()
        aiohttp_caller.set_parser(from_caller)  # type: ignore[arg-type]
        connection.set_parser(from_upstream, None)
        upstream_transport = connection.transport
        if upstream_transport is None:
            # The upstream closed right after its 101: the caller gets what it sent, then the end.
            self.bytes_out = len(from_upstream.data)
            caller_transport.write(head + from_upstream.data)
            self.ended_by = "upstream"
            return SentResponse(101, keep_alive=False)  # aiohttp closes the caller's connection
        self._handler = asyncio.current_task()
        self._aiohttp_caller = aiohttp_caller
        caller = self._caller = _Side(self, caller_transport, "caller")
        upstream_side = self._upstream_side = _Side(self, upstream_transport, "upstream")
        caller.peer, upstream_side.peer = upstream_side, caller
        caller_transport.set_protocol(caller)
        upstream_transport.set_protocol(upstream_side)
        if aiohttp_caller.writing_paused:  # the transport will tell the new protocol when it drains
            upstream_transport.pause_reading()
        if connection.writing_paused:
            caller_transport.pause_reading()
        caller_transport.write(head)
        self._tunnels.open.add(self)
        self._metrics.websocket_opened()
        try:
            if from_caller.data:
                self.relay(caller, bytes(from_caller.data))
            if from_upstream.data:
                self.relay(upstream_side, bytes(from_upstream.data))
            self._timer = self._loop.call_at(self._last + self._idle, self._check_idle)
            try:
                await self._ended
            except asyncio.CancelledError:
                self.go_away()
                raise
        finally:
            self._tunnels.open.discard(self)
            self._metrics.websocket_closed()
        return SentResponse(101, keep_alive=False)

    def relay(self, source: _Side, data: bytes) -> None:
        if self.ended_by:
            return
        self._last = self._loop.time()
        if source is self._caller:
            self.bytes_in += len(data)
        else:
            self.bytes_out += len(data)
        source.frames.feed(data)
        source.peer.transport.write(data)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self._caller:
            self._tell_aiohttp(exc)
        self._finish(side.name)

    def _tell_aiohttp(self, exc: Exception | None) -> None:
        """aiohttp's server keeps count of its connections: it hears of this one's end once the
        request handler has returned (before that, it would cancel the handler as for a caller
        gone mid-request, and the tunnel's normal end would count as 499)."""
        protocol = self._aiohttp_caller
        handler = self._handler
        if protocol is None:
            return
        if handler is None or handler.done():
            protocol.connection_lost(exc)
        else:
            handler.add_done_callback(lambda _: protocol.connection_lost(exc))

    def _check_idle(self) -> None:
        self._timer = None
        due = self._last + self._idle
        if self._loop.time() >= due:
            log.debug("websocket idle for %gs: closing both sides", self._idle)
            self._finish("idle", cut=True)
        else:
            self._timer = self._loop.call_at(due, self._check_idle)

    def go_away(self) -> None:
        """End the tunnel for a shutdown: close frames 1001 first, where each direction is between frames."""
        caller, upstream = self._caller, self._upstream_side
        if self.ended_by or caller is None or upstream is None:
            return
        if upstream.frames.at_boundary and not upstream.frames.closed and not caller.lost:
            caller.transport.write(GOING_AWAY_TO_CALLER)
        if caller.frames.at_boundary and not caller.frames.closed and not upstream.lost:
            upstream.transport.write(_to_upstream(GOING_AWAY))
        self._finish("shutdown")

    def _finish(self, by: str, cut: bool = False) -> None:
        if self.ended_by:
            return
        self.ended_by = by
        if not self._ended.done():
            self._ended.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for side in (self._caller, self._upstream_side):
            if side is None or side.lost:
                continue
            transport = side.transport
            if cut:
                transport.abort()
            else:
                transport.close()  # after what is queued for it is written
                self._loop.call_later(FLUSH_GRACE, transport.abort)  # a no-op once it is closed


def _to_upstream(payload: bytes) -> bytes:
    """A close frame as a client sends it: masked (RFC 6455 5.3)."""
    mask = os.urandom(4)
    return bytes((0x88, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _switching_head(upstream: UpstreamResponse, request_id: str, extra: dict[str, str]) -> bytes | None:
    """The upstream's 101 for the caller: its end-to-end headers (Sec-WebSocket-*), the upgrade, ours."""
    headers = upstream.headers
    lines = [f"HTTP/1.1 101 {upstream.reason or 'Switching Protocols'}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in downstream_fields(headers, dropped_names(headers)))
    lines.append("Connection: Upgrade\r\n")
    lines.append(f"Upgrade: {headers.get('Upgrade', 'websocket')}\r\n")
    if REQUEST_ID not in headers:
        lines.append(f"{REQUEST_ID}: {request_id}\r\n")
    lines.extend(f"{name}: {value}\r\n" for name, value in extra.items())
    lines.append("\r\n")
    return encode_head(lines)
