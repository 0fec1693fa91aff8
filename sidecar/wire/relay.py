"""Streaming the chosen upstream response to the caller, chunk by chunk, under an idle watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import hdrs, web
from aiohttp.http_writer import StreamWriter

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

    def __init__(self, status: int, reason: str, typed: bool) -> None:
        super().__init__(status=status, reason=reason)
        self._typed = typed  # whether the upstream sent a Content-Type

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if not self._typed:
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


async def _caught_up(request: web.BaseRequest) -> None:
    """Wait while the caller reads slower than we answer, as aiohttp's own writes do."""
    if request.protocol.writing_paused:
        with contextlib.suppress(ConnectionError):  # the caller left: aiohttp closes its connection
            await request.writer.drain()


async def relay(
    request: web.BaseRequest, upstream: Relayable, request_id: str, idle: float, extra: dict[str, str],
    keep_alive: bool = True,
) -> web.StreamResponse:
    """Send `upstream` to the caller as it arrives. Bytes pass untouched (no decoding).

    If either side fails or goes silent for `idle` mid-body, both connections are
    closed: a truncated body must never look complete to the caller.
    """
    content = upstream.content
    if content.total_bytes and not has_no_body(request.method, upstream.status):
        sent = send_whole(request, upstream, request_id, extra, keep_alive)
        if sent is not None:
            await _caught_up(request)
            return sent
    kind = HeldHeadResponse if content.total_bytes else RelayedResponse
    # Headers go straight into the response's own: passing them in would copy them again.
    response = kind(upstream.status, upstream.reason, hdrs.CONTENT_TYPE in upstream.headers)
    add_downstream_response_headers(response.headers, upstream.headers, request_id)
    response.headers.update(extra)
    if not keep_alive:
        response.force_close()
    try:
        await response.prepare(request)
        if has_no_body(request.method, upstream.status):
            upstream.release()
            return response
        if content.is_eof():
            # The whole body came with the headers (small responses): send it in one go.
            await response.write_eof(content.read_nowait())
            upstream.release()
            return response
        loop = asyncio.get_running_loop()
        # One watchdog for the whole body, pushed forward whenever a chunk moves:
        # it catches a silent upstream and a caller that stopped reading alike.
        async with asyncio.timeout(idle) as watchdog:
            while chunk := await content.readany():
                await response.write(chunk)
                watchdog.reschedule(loop.time() + idle)
    except asyncio.CancelledError:
        upstream.close()  # the caller hung up: drop the upstream connection too
        raise
    except Exception as exc:  # noqa: BLE001 - any failure mid-body ends both sides the same way
        log.debug("relay of %s aborted: %r", request_id, exc)
        upstream.close()
        if request.transport is not None:
            request.transport.abort()
        return response
    upstream.release()
    return response
