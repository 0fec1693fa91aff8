"""One JSON line per request on stdout, written in batches so logging stays cheap.

Fields: time, request_id, route, method, path (query only with `log.query: true`),
status, duration_ms, upstream_ms, attempts, endpoint, breaker, error.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import TextIO

import msgspec

from sidecar.config.schema import Log
from sidecar.timestamps import IsoPerSecond

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
    ) -> None:
        if self._sample < 1.0 and random.random() >= self._sample:
            return
        path = raw_path if self._query else raw_path.split("?", 1)[0]
        line = _encode({
            "time": self._iso(time.time()), "request_id": request_id, "route": route, "method": method, "path": path,
            "status": status, "duration_ms": round(duration * 1000, 3), "upstream_ms": round(upstream * 1000, 3),
            "attempts": attempts, "endpoint": endpoint, "breaker": breaker, "error": error,
        }).decode()
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        if self._pending:
            self._stream.write("\n".join(self._pending) + "\n")
            self._stream.flush()
            self._pending.clear()
