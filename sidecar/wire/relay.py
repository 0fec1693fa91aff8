"""Streaming the chosen upstream response to the caller, chunk by chunk, under an idle watchdog.

Once the upstream has sent its last byte, the answer no longer needs the route: the
upstream connection goes back to the pool and `finished` frees the concurrency slot as
soon as at most `server.response_buffer` bytes of it still wait here for the caller
(more than that: the slot is held while the caller catches up). The caller then reads
the rest at its own pace, and one that takes nothing for `server.send_timeout` is
disconnected, so a slow reader holds only its own connection and a bounded buffer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.http_writer import StreamWriter

from sidecar.config.schema import Server
from sidecar.errors import CallerGone, CallerTooSlow, UpstreamReset, UpstreamTimeout
from sidecar.wire.answer import Relayable
from sidecar.wire.headers import add_downstream_response_headers, encode_head
from sidecar.wire.whole_response import send_whole

log = logging.getLogger("sidecar.relay")


class RelayedResponse(web.StreamResponse):
    """aiohttp's response, framing and all, with two differences a proxy needs:

    - no `Content-Type: application/octet-stream` is invented for an upstream answer that had
      none (it changes what clients sniff; nginx, HAProxy and Envoy add none);
    - the head is encoded by the sidecar's one head encoder, so header bytes that are not
      UTF-8 (obs-text such as `caf\xe9`) leave exactly as they came, as on the small-response
      path (aiohttp's writer drops them).
    """

    async def _prepare_headers(self) -> None:
        typed = hdrs.CONTENT_TYPE in self.headers  # the upstream's headers are all in by now
        await super()._prepare_headers()
        if not typed:
            self.headers.popall(hdrs.CONTENT_TYPE, None)

    async def _write_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and isinstance(writer, StreamWriter)
        version = request.version
        lines = [f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers.items())
        lines.append("\r\n")
        head = encode_head(lines)
        if head is None:
            raise ValueError("a response header holds a line break")
        # The writer keeps the head until the first body write (or sends it now): aiohttp's
        # own write_headers does exactly this with the head it serialised.
        writer._headers_buf = head
        writer._headers_written = False
        if self._send_headers_immediately:
            writer.send_headers()


class HeldHeadResponse(RelayedResponse):
    """Headers wait for the first body write and leave with it: one write, one segment.

    (aiohttp's own `Response` does this; a StreamResponse sends headers at prepare().)
    Used only when body bytes are already here, so the caller never waits for headers.
    """

    _send_headers_immediately = False


def has_no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304) or status < 200


# A high-water mark no answer held in memory reaches (and that uvloop's C int takes).
NEVER_PAUSE = 1 << 30


def _set_high_water(request: web.BaseRequest, high: int) -> None:
    """Writing to the caller pauses (aiohttp's writes wait) once more than `high` bytes wait here."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.set_write_buffer_limits(high=min(high, NEVER_PAUSE))


# Why an answer whose head had gone out did not reach the caller whole: the access log's
# `error` for it (errors.py lists the kinds). The caller saw the status; this says the rest.
CALLER_GONE = CallerGone.kind  # it hung up, or its connection failed
CALLER_TOO_SLOW = CallerTooSlow.kind  # it took nothing for server.send_timeout and was cut off


async def _drained_to(
    transport: asyncio.Transport, writer: StreamWriter, target: int, send_timeout: float
) -> str | None:
    """Wait until at most `target` bytes of ours wait for the caller. A caller that takes
    nothing for `send_timeout` is disconnected. None once drained; else why not."""
    if transport.is_closing():
        return CALLER_GONE
    left = transport.get_write_buffer_size()
    if left <= target:
        return None
    low, high = transport.get_write_buffer_limits()
    try:
        while left > target:  # bounded: each round is a byte or more taken, or the end
            # Writing pauses now and resumes at the first byte the caller takes, so each
            # wait below is for progress, not for the whole rest.
            transport.set_write_buffer_limits(high=left - 1, low=left - 1)
            try:
                async with asyncio.timeout(send_timeout):
                    await writer.drain()
            except TimeoutError:
                log.debug("a caller took nothing for %gs: disconnected", send_timeout)
                transport.abort()
                return CALLER_TOO_SLOW
            except OSError:  # the caller left
                return CALLER_GONE
            if transport.is_closing():
                return CALLER_GONE
            left = transport.get_write_buffer_size()
        return None
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


async def _handed_over(request: web.BaseRequest, finished: Callable[[], None], server: Server) -> str | None:
    """The upstream is done and released, and the whole answer is with the transport: free the
    slot once at most `response_buffer` bytes wait here, then see the caller take the rest.
    None when it did; else why not (the slot is freed by the proxy then)."""
    transport = request.transport
    if transport is None or not transport.get_write_buffer_size():
        finished()  # the kernel took it all: the common case costs no wait
        return None
    writer = cast(StreamWriter, request.writer)
    if (cut_short := await _drained_to(transport, writer, server.response_buffer, server.send_timeout)) is None:
        finished()
        cut_short = await _drained_to(transport, writer, 0, server.send_timeout)
    return cut_short


async def relay(
    request: web.BaseRequest, upstream: Relayable, request_id: str, idle: float, extra: dict[str, str],
    keep_alive: bool, finished: Callable[[], None], server: Server,
) -> tuple[web.StreamResponse, str | None]:
    """Send `upstream` to the caller as it arrives. Bytes pass untouched (no decoding).

    If either side fails or goes silent for `idle` mid-body, both connections are
    closed: a truncated body must never look complete to the caller. `finished` is
    called once the upstream is done and at most `server.response_buffer` bytes wait
    for the caller (it frees the route's slot); not at all when the relay failed.
    Returns the response for aiohttp, and None when the caller got all of it, or the
    error kind of why not (the head, and its status, had gone out): for the access log.
    """
    content = upstream.content
    if content.total_bytes and not has_no_body(request.method, upstream.status):
        sent = send_whole(request, upstream, request_id, extra, keep_alive)
        if sent is not None:
            return sent, await _handed_over(request, finished, server)
    kind = HeldHeadResponse if content.total_bytes else RelayedResponse
    # Headers go straight into the response's own: passing them in would copy them again.
    response = kind(status=upstream.status, reason=upstream.reason)
    add_downstream_response_headers(response.headers, upstream.headers, request_id)
    response.headers.update(extra)
    if not keep_alive:
        response.force_close()
    try:
        await response.prepare(request)
        if not has_no_body(request.method, upstream.status):
            writer = cast(StreamWriter, request.writer)  # aiohttp's server always writes through one
            if content.is_eof():
                # The whole body came with the headers (small responses): one write, its end
                # included. Writing must not pause inside write_eof, whose wait for the caller
                # has no timeout: _handed_over waits below instead, within send_timeout.
                _set_high_water(request, NEVER_PAUSE)
                await writer.write_eof(content.read_nowait())
                _set_high_water(request, server.response_buffer)
            else:
                # Backpressure on the upstream starts once more than response_buffer waits here.
                _set_high_water(request, server.response_buffer)
                loop = asyncio.get_running_loop()
                # One watchdog for the whole body, pushed forward whenever a chunk moves:
                # it catches a silent upstream and a caller that stopped reading alike.
                async with asyncio.timeout(idle) as watchdog:
                    while chunk := await content.readany():
                        await response.write(chunk)
                        watchdog.reschedule(loop.time() + idle)
                writer.set_eof()  # the end goes out now; aiohttp's write_eof would wait for the caller
    except asyncio.CancelledError:
        upstream.close()  # the caller hung up: drop the upstream connection too
        raise
    except Exception as exc:  # noqa: BLE001 - any failure mid-body ends both sides the same way
        log.debug("relay of %s aborted: %r", request_id, exc)
        upstream.close()
        caller = request.transport
        gone = caller is None or caller.is_closing()
        if caller is not None:
            caller.abort()
        # The watchdog fires for a silent upstream and a caller that stopped reading alike.
        if isinstance(exc, TimeoutError):
            return response, UpstreamTimeout.kind
        return response, CALLER_GONE if gone else UpstreamReset.kind
    upstream.release()
    return response, await _handed_over(request, finished, server)
