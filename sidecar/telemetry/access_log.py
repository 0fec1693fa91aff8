"""One JSON line per request on stdout, written in batches so logging stays cheap.

Fields: time, request_id, route, method, path (query only with `log.query: true`),
status, duration_ms, upstream_ms, attempts, endpoint, breaker, error. A WebSocket connection
(status 101) is logged once, when it ends, with `bytes_in` and `bytes_out` added: the bytes it
relayed from and to the caller after the handshake.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import TextIO

import msgspec

from sidecar.config.schema import Log
from sidecar.telemetry.timestamps import IsoPerSecond

FLUSH_AFTER = 0.05  # seconds: lines written in one batch reach the collector together
# msgspec (already used for the config) encodes a line in a tenth of json.dumps's time.
_encode = msgspec.json.Encoder().encode


class AccessLog:
    def __init__(self, policy: Log, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._pending: list[str] = []
        self._iso = IsoPerSecond()
        self.configure(policy)

    def configure(self, policy: Log) -> None:
        """Apply (re)loaded settings; lines already pending are still written."""
        self.enabled = policy.access and policy.sample > 0
        self._sample = policy.sample
        self._query = policy.query

    def record(
        self, request_id: str, route: str | None, method: str, raw_path: str, status: int, duration: float,
        upstream: float, attempts: int, endpoint: str | None, breaker: str | None, error: str | None,
        tunnelled: tuple[int, int] | None = None,
    ) -> None:
        """`tunnelled`: (bytes in, bytes out) of a WebSocket connection, for the fields only its line has."""
        if self._sample < 1.0 and random.random() >= self._sample:
            return
        path = raw_path if self._query else raw_path.split("?", 1)[0]
        fields: dict[str, object] = {
            "time": self._iso(time.time()), "request_id": request_id, "route": route, "method": method, "path": path,
            "status": status, "duration_ms": round(duration * 1000, 3), "upstream_ms": round(upstream * 1000, 3),
            "attempts": attempts, "endpoint": endpoint, "breaker": breaker, "error": error,
        }
        if tunnelled is not None:
            fields["bytes_in"], fields["bytes_out"] = tunnelled
        line = _encode(fields).decode()
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        if self._pending:
            self._stream.write("\n".join(self._pending) + "\n")
            self._stream.flush()
            self._pending.clear()
