"""The `cache:` section of a route (issue 18): a shared response cache, off unless written.

Kept in its own module so the cache's package (sidecar/cache/) owns its settings; schema.py
only needs `cache: Cache | None = None` on `Route`.
"""

from __future__ import annotations

import msgspec

from sidecar.config.units import Duration, Size, duration, size


class Cache(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # The whole route's entries, headers included, evicted least recently used by bytes.
    max_bytes: Size = size("64MiB")
    # The largest body stored; bigger responses stream through uncached, never buffered.
    # Capped at max_bytes (so a small max_bytes alone is a complete setting).
    max_entry: Size = size("1MiB")
    # How long after an entry went stale it may still answer when the upstream fails.
    # A response's own `stale-if-error=N` wins.
    stale_if_error: Duration = duration("5m")
    # How long after going stale an entry is served while one request refreshes it.
    # A response's own `stale-while-revalidate=N` wins.
    stale_while_revalidate: Duration = duration("0s")
    # Freshness of responses that state none (no s-maxage, max-age or Expires). 0: such
    # responses are stored (for revalidation and stale-if-error) but never served fresh.
    default_ttl: Duration = duration("0s")
    # Concurrent misses for the same key send one request upstream.
    coalesce: bool = True

    def __post_init__(self) -> None:
        # msgspec reports a ValueError from here as a validation error at the section's path.
        if self.max_bytes < 1:
            raise ValueError("cache.max_bytes must be at least 1 byte")
