"""The caller's request body: read whole before the request takes a slot when small, else streamed once.

A body whose declared Content-Length fits `retries.max_body` is read completely before
the request joins its route's policy stack (as nginx buffers request bodies): a caller
that trickles it holds only its own connection, never a concurrency slot or an upstream
connection, and is answered 408 when it stalls for `server.body_timeout` between reads.
Larger and chunked bodies stream to the upstream as they come (backpressure both ways),
holding the slot, with `timeouts.idle` between chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import StreamReader

from sidecar.errors import CallerGone, PayloadTooLarge, RequestBodyTimeout


class CallerBody:
    """The caller's body as it arrives, with a per-chunk idle timeout.

    `started` tells whether any byte has been pulled: until then an attempt that failed
    (a refused connect) can be retried with the same body. Failures are raised as our
    own errors, not OSError, so the forward step can tell the caller's failure from
    the upstream's.

    `on_first_read` runs once, when the body is first pulled: it answers a caller's
    `Expect: 100-continue` at the moment the sidecar is ready for the body, as nginx does,
    so the caller never waits for a 100 the upstream's side would have to send.
    """

    __slots__ = ("_content", "_idle", "_max_body", "_on_first_read", "started")

    def __init__(
        self, content: StreamReader, idle: float, max_body: int | None = None,
        on_first_read: Callable[[], None] | None = None,
    ) -> None:
        self._content = content
        self._idle = idle
        self._max_body = max_body
        self._on_first_read = on_first_read
        self.started = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        self._asked_for()
        received = 0
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                raise RequestBodyTimeout(f"the request body was silent for more than {self._idle:g}s") from None
            except ConnectionError:
                raise CallerGone("the caller closed the connection while sending the body") from None
            if not chunk:
                return
            received += len(chunk)
            if self._max_body is not None and received > self._max_body:
                # Raised mid-stream: the upstream sees a broken body, the caller a 413.
                raise PayloadTooLarge(f"the request body is larger than {self._max_body} bytes")
            yield chunk

    async def read_small(self, stall: float) -> bytes:
        """The whole of a small body, allowing `stall` seconds between reads (server.body_timeout)."""
        self._asked_for()
        content = self._content
        if content.is_eof():
            return content.read_nowait()  # it came with the headers: the common case costs no timer
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(stall) as watchdog:
                while chunk := await content.readany():
                    chunks.append(chunk)
                    watchdog.reschedule(loop.time() + stall)
        except TimeoutError:
            raise RequestBodyTimeout(f"the request body was silent for more than {stall:g}s") from None
        except ConnectionError:
            raise CallerGone("the caller closed the connection while sending the body") from None
        return b"".join(chunks)

    def _asked_for(self) -> None:
        """The body is wanted now: a caller waiting for `100 Continue` gets it."""
        if self._on_first_read is not None:
            self._on_first_read()
            self._on_first_read = None


# What a call sends: nothing, bytes that can be replayed, or the caller's stream.
Body = bytes | CallerBody | None
