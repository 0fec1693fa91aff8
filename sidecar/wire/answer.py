"""What the wire can send back to a caller: any response with these members (the upstream
client's, or one a room makes, such as a cache hit). Structurally the same as proxy/call.py's
`Response`, so the wire never imports the proxy."""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDictProxy


class Relayable(Protocol):
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: StreamReader

    def release(self) -> None: ...

    def close(self) -> None: ...


def complete_content(body: bytes) -> StreamReader:
    """A body already whole, as the reader relay.py takes: fed and at EOF (e.g. a cache hit)."""
    loop = asyncio.get_running_loop()
    # No transport behind it; a limit above the body's size means feeding never asks one to pause.
    content = StreamReader(BaseProtocol(loop), max(len(body), 2**16), loop=loop)
    if body:
        content.feed_data(body)
    content.feed_eof()
    return content
