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
from sidecar.telemetry.exchange import Exchange
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

    def record(self, exchange: Exchange) -> None:
        """One line for `exchange`; a WebSocket connection's line also has bytes_in and bytes_out."""
        if self._sample < 1.0 and random.random() >= self._sample:
            return
        raw_path = exchange.path
        path = raw_path if self._query else raw_path.split("?", 1)[0]
        fields: dict[str, object] = {
            "time": self._iso(time.time()), "request_id": exchange.request_id, "route": exchange.route,
            "method": exchange.method, "path": path, "status": exchange.status,
            "duration_ms": round(exchange.duration * 1000, 3),
            "upstream_ms": round(exchange.upstream_seconds * 1000, 3),
            "attempts": exchange.attempts, "endpoint": exchange.endpoint, "breaker": exchange.breaker,
            "error": exchange.error,
        }
        if exchange.tunnelled is not None:
            fields["bytes_in"], fields["bytes_out"] = exchange.tunnelled
        line = _encode(fields).decode()
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        if self._pending:
            self._stream.write("\n".join(self._pending) + "\n")
            self._stream.flush()
            self._pending.clear()
