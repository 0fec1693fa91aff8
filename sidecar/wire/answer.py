"""What the wire can send back to a caller: any response with these members (the upstream
client's, or one a room makes, such as a cache hit). Structurally the same as proxy/call.py's
`Response`, so the wire never imports the proxy."""

from __future__ import annotations

from typing import Protocol

from aiohttp import StreamReader
from multidict import CIMultiDictProxy


class Relayable(Protocol):
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: StreamReader

    def release(self) -> None: ...

    def close(self) -> None: ...
