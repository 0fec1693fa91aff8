"""What the wire can send back to a caller: any response with these members (the upstream
client's, or one a room makes, such as a cache hit). Structurally the same as proxy/call.py's
`Response`, so the wire never imports the proxy.

And a stored answer's head, encoded once (`PreparedHead`): what lets a fresh cache hit be
written before aiohttp builds a request for it (server_protocol.py's early answers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import ClientError, StreamReader
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDictProxy

from sidecar.errors import SidecarError, UpstreamReset, UpstreamTimeout
from sidecar.wire.headers import encode_head


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


async def drain(response: Relayable, idle: float) -> bool:
    """Read `response`'s body to its end and drop it, silent at most `idle` seconds at a time.
    True when it ended (the connection goes back to the pool); False when it broke off or
    stalled (the connection is closed). What broke it (aiohttp's payload errors, a reset, a
    timeout) stays here: the caller only needs to know whether the answer was whole."""
    try:
        while True:
            async with asyncio.timeout(idle):
                if not await response.content.readany():
                    break
    except (TimeoutError, OSError, ClientError, SidecarError):
        response.close()
        return False
    response.release()
    return True


async def read_whole(response: Relayable, size: int, idle: float) -> bytes:
    """The whole body of `size` bytes (known before reading); the connection goes back to the
    pool after it. A body that stalls for `idle` or breaks off raises UpstreamTimeout or
    UpstreamReset, whatever the library raised: the wire maps foreign exceptions here."""
    content = response.content
    chunks: list[bytes] = []
    received = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(idle) as watchdog:
            while received < size and (chunk := await content.readany()):
                chunks.append(chunk)
                received += len(chunk)
                watchdog.reschedule(loop.time() + idle)
    except TimeoutError:
        response.close()
        raise UpstreamTimeout(f"the upstream's body went silent for more than {idle:g}s") from None
    except Exception as exc:  # whatever broke the body, the answer is the same
        response.close()
        raise UpstreamReset(f"the upstream's body broke off: {exc!r}") from exc
    except BaseException:  # cancelled: the caller left mid-body
        response.close()
        raise
    body = b"".join(chunks)
    if len(body) != size:
        response.close()
        raise UpstreamReset(f"the upstream's body ended after {len(body)} of {size} bytes")
    response.release()
    return body


@dataclass(frozen=True, slots=True)
class PreparedHead:
    """The part of a stored answer's head that is the same for every caller, as bytes: the
    status line and the stored header lines. Each answer appends its own lines (Age, the
    request id, Date and Server where the stored ones have none): whole_response.early_answer."""

    lines: bytes
    has_date: bool
    has_server: bool


def prepare_head(status: int, reason: str, fields: Iterable[tuple[str, str]], body: bytes) -> PreparedHead | None:
    """The status line and `fields` of a stored answer with `body`, encoded as whole_response.py
    writes them. None when that is not how the answer would go out: no body, or one its
    Content-Length does not frame (HEAD, 204 and the rest go through relay.py), or a value
    with a line break (the usual path refuses it)."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    has_date = has_server = False
    length = None
    for name, value in fields:
        lines.append(f"{name}: {value}\r\n")
        lower = name.lower()
        has_date = has_date or lower == "date"
        has_server = has_server or lower == "server"
        if lower == "content-length" and length is None:
            length = value  # send_whole compares the first one
    if not body or length != str(len(body)):
        return None
    encoded = encode_head(lines)
    return None if encoded is None else PreparedHead(encoded, has_date, has_server)
