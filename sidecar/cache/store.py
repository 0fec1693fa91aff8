"""A route's stored responses: a least-recently-used map bounded in bytes.

Keys are (primary key, variant key): the request target, and the request's values of
the fields the stored response varies on (rules.variant_key). The byte count of an
entry is measured from the Python objects it holds (sys.getsizeof of the body, each
header pair and its strings, the keys, plus a fixed share for the record itself), not
from the wire size, so `max_bytes` bounds memory rather than a smaller wire figure.
The sum never exceeds `max_bytes`: an entry is admitted only after enough least
recently used ones have gone, and one that cannot fit at all is refused.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.cache.rules import Fields, Freshness
from sidecar.wire.answer import PreparedHead

# The record, its Freshness (floats, validators), the map slots and the key tuple. With
# tracemalloc on CPython 3.11, 20,000 entries of five distinct header lines and a 100-byte
# body took 2,293 bytes each; at 1,024 here they count 2,452: the count errs high.
ENTRY_OVERHEAD = 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response, immutable: a refresh stores a new Entry in its place."""

    status: int
    reason: str
    headers: Fields
    body: bytes
    request_time: float  # when the request that fetched it left (epoch seconds)
    response_time: float  # when its headers arrived
    variant: str  # the secondary key (rules.variant_key) of the request that fetched it
    vary: tuple[str, ...]  # the field names its Vary nominates (rules.vary_names)
    freshness: Freshness
    # Its head as a fresh hit sends it, encoded once (without Age): None when such an answer
    # must take the usual path (see RouteCache.early_hit).
    head: PreparedHead | None = field(default=None, compare=False)
    size: int = field(default=0, compare=False)  # filled in by `measured`


def measured(entry: Entry, key: str) -> Entry:
    """The entry with its size in bytes as the store counts it."""
    size = ENTRY_OVERHEAD + sys.getsizeof(entry.body) + sys.getsizeof(entry.headers)
    size += sys.getsizeof(key) + sys.getsizeof(entry.variant) + sys.getsizeof(entry.reason)
    for name, value in entry.headers:
        size += sys.getsizeof((name, value)) + sys.getsizeof(name) + sys.getsizeof(value)
    for name in entry.vary:
        size += sys.getsizeof(name)
    if entry.head is not None:
        size += sys.getsizeof(entry.head) + sys.getsizeof(entry.head.lines)
    return Entry(
        entry.status, entry.reason, entry.headers, entry.body, entry.request_time, entry.response_time,
        entry.variant, entry.vary, entry.freshness, entry.head, size,
    )


class Store:
    """One route's entries. Not thread-safe; one event loop uses it."""

    def __init__(self, max_bytes: int, max_entry: int, clock: Callable[[], float]) -> None:
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)  # bounds a body; the whole entry must fit max_bytes
        self._clock = clock
        self._lru: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # least recently used first
        self._variants: dict[str, list[str]] = {}  # primary key -> its variant keys
        self.bytes = 0
        self.evictions = 0  # entries dropped to make room (not replaced, expired or purged)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        """Whether anything is stored under `key` (however usable); marks nothing used."""
        return key in self._variants

    def items(self) -> list[tuple[str, Entry]]:
        """Every (key, entry), least recently used first, without marking any used."""
        return [(key, entry) for (key, _), entry in self._lru.items()]

    def variants(self, key: str) -> list[Entry]:
        """The entries stored under `key`, most recently fetched first; marks them used.

        Entries that can answer nothing any more (see Freshness.useless_after) are dropped here.
        """
        variant_keys = self._variants.get(key)
        if not variant_keys:
            return []
        now = self._clock()
        found = []
        for variant in list(variant_keys):
            entry = self._lru[key, variant]
            if entry.freshness.useless_after < now:
                self._remove(key, variant)
                continue
            self._lru.move_to_end((key, variant))
            found.append(entry)
        found.sort(key=lambda e: e.response_time, reverse=True)
        return found

    def put(self, key: str, entry: Entry) -> bool:
        """Store `entry` (replacing the one of the same variant); False if it may never fit.

        Entries of `key` that vary on other fields are dropped: the upstream changed how the
        resource varies, and they could only answer with an older representation.
        """
        if len(entry.body) > self.max_entry:
            return False
        if not entry.size:
            entry = measured(entry, key)
        if entry.size > self.max_bytes:
            return False
        for variant in list(self._variants.get(key, ())):
            if variant == entry.variant or self._lru[key, variant].vary != entry.vary:
                self._remove(key, variant)
        while self.bytes + entry.size > self.max_bytes:
            (old_key, old_variant), _ = next(iter(self._lru.items()))
            self._remove(old_key, old_variant)
            self.evictions += 1
        self._lru[key, entry.variant] = entry
        self._variants.setdefault(key, []).append(entry.variant)
        self.bytes += entry.size
        return True

    def remove(self, key: str) -> int:
        """Drop every variant of `key` (e.g. after a successful unsafe request on it)."""
        variants = list(self._variants.get(key, ()))
        for variant in variants:
            self._remove(key, variant)
        return len(variants)

    def purge(self, prefix: str = "") -> int:
        """Drop every entry whose key starts with `prefix` ("" drops all); how many went."""
        keys = [key for key in self._variants if key.startswith(prefix)]
        return sum(self.remove(key) for key in keys)

    def _remove(self, key: str, variant: str) -> None:
        entry = self._lru.pop((key, variant))
        self.bytes -= entry.size
        variants = self._variants[key]
        variants.remove(variant)
        if not variants:
            del self._variants[key]
