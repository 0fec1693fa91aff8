"""The route's byte-bounded LRU store (sidecar/cache/store.py), with a fake clock."""

from __future__ import annotations

import tracemalloc

from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.cache import rules
from sidecar.cache.rules import Defaults
from sidecar.cache.store import Entry, Store, measured

T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = b"x" * 100, variant: str = "", vary: tuple[str, ...] = (),
          cache_control: str = "max-age=60", etag: str | None = '"v"', extra: int = 0) -> Entry:
    pairs = [("Cache-Control", cache_control), ("Content-Length", str(len(body)))]
    if etag is not None:
        pairs.append(("ETag", etag))
    pairs += [(f"X-Pad-{i}", "p" * 20) for i in range(extra)]
    headers = CIMultiDict(pairs)
    return Entry(200, "OK", rules.stored_fields(headers), body, T0, T0, variant, vary,
                 rules.freshness(headers, T0, T0, Defaults(stale_if_error=300)))


def test_size_counts_body_and_headers() -> None:
    small = measured(entry(body=b"x" * 100), "/a")
    bigger_body = measured(entry(body=b"x" * 900), "/a")
    more_headers = measured(entry(body=b"x" * 100, extra=10), "/a")
    assert bigger_body.size - small.size == 800
    assert more_headers.size - small.size > 10 * 40  # every header line counts, more than its text


def test_counted_bytes_are_at_least_the_memory_entries_take() -> None:
    """max_bytes bounds memory: the count must not be below what the entries really allocate."""
    store = Store(10**9, 10**6, Clock())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            headers = CIMultiDict([
                ("Content-Type", f"text/plain; v={i}"), ("ETag", f'"etag-{i}"'), ("Cache-Control", f"max-age={i}"),
                ("Date", f"Sun, 06 Nov 1994 08:49:{i % 60:02d} GMT"), ("Content-Length", "120"),
            ])
            body = f"{i:0>120}".encode()
            store.put(f"/items/{i}", Entry(
                200, "OK", rules.stored_fields(headers), body, T0, T0, "", (),
                rules.freshness(headers, T0, T0, Defaults()),
            ))
            del headers, body
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.bytes >= allocated


def test_lru_order_and_eviction_counter() -> None:
    one = measured(entry(), "/0").size
    store = Store(max_bytes=3 * one + 10, max_entry=10_000, clock=Clock())
    for key in ("/0", "/1", "/2"):
        assert store.put(key, entry())
    assert store.evictions == 0
    store.variants("/0")  # used: now the most recent
    assert store.put("/3", entry())  # evicts /1, the least recently used
    assert [bool(store.variants(k)) for k in ("/0", "/1", "/2", "/3")] == [True, False, True, True]
    assert store.evictions == 1
    assert store.bytes == 3 * one
    assert len(store) == 3


def test_replacing_a_variant_is_not_an_eviction() -> None:
    store = Store(10**6, 10**5, Clock())
    store.put("/a", entry(body=b"old"))
    store.put("/a", entry(body=b"new!"))
    assert [e.body for e in store.variants("/a")] == [b"new!"]
    assert store.evictions == 0
    assert store.bytes == measured(entry(body=b"new!"), "/a").size


def test_variants_live_side_by_side_until_the_vary_changes() -> None:
    store = Store(10**6, 10**5, Clock())
    store.put("/a", entry(body=b"gz", variant="accept-encoding:gzip", vary=("accept-encoding",)))
    store.put("/a", entry(body=b"plain", variant="accept-encoding:", vary=("accept-encoding",)))
    assert sorted(e.body for e in store.variants("/a")) == [b"gz", b"plain"]
    # The upstream now varies on something else: the old variants cannot be chosen right any more.
    store.put("/a", entry(body=b"en", variant="accept-language:en", vary=("accept-language",)))
    assert [e.body for e in store.variants("/a")] == [b"en"]
    assert len(store) == 1


def test_too_big_is_refused_and_changes_nothing() -> None:
    store = Store(max_bytes=5000, max_entry=1000, clock=Clock())
    assert store.put("/small", entry(body=b"s" * 10))
    before = store.bytes
    assert not store.put("/big", entry(body=b"b" * 1001))  # over max_entry
    assert store.bytes == before and not store.variants("/big")
    tiny = Store(max_bytes=1500, max_entry=1500, clock=Clock())
    assert not tiny.put("/x", entry(body=b"x" * 1400))  # body fits max_entry, the whole entry not max_bytes
    assert tiny.bytes == 0


def test_max_entry_is_capped_by_max_bytes() -> None:
    assert Store(max_bytes=1000, max_entry=10**6, clock=Clock()).max_entry == 1000


def test_purge_by_prefix() -> None:
    store = Store(10**6, 10**5, Clock())
    for key in ("/users/1", "/users/2", "/users/2", "/orders/1", "/users"):
        store.put(key, entry())
    assert store.purge("/users/") == 2
    assert [bool(store.variants(k)) for k in ("/users/1", "/users/2", "/orders/1", "/users")] == [
        False, False, True, True]
    assert store.purge() == 2
    assert store.bytes == 0 and len(store) == 0
    assert store.evictions == 0  # purges are not evictions


def test_remove_drops_every_variant() -> None:
    store = Store(10**6, 10**5, Clock())
    store.put("/a", entry(variant="v1", vary=("accept",)))
    store.put("/a", entry(variant="v2", vary=("accept",)))
    assert store.remove("/a") == 2
    assert store.bytes == 0


def test_entries_that_can_answer_nothing_are_dropped_on_lookup() -> None:
    clock = Clock()
    store = Store(10**6, 10**5, clock)
    store.put("/no-validator", entry(etag=None))  # fresh 60 s, then stale-if-error 300 s
    store.put("/validator", entry())
    clock.now = T0 + 360
    assert store.variants("/no-validator") and store.variants("/validator")
    clock.now = T0 + 361
    assert not store.variants("/no-validator")
    assert store.variants("/validator")  # still good for a revalidation
    assert len(store) == 1 and store.bytes == measured(entry(), "/validator").size


def test_lookup_lists_most_recent_first() -> None:
    store = Store(10**6, 10**5, Clock())
    older = entry(variant="a", vary=("accept",))
    newer = Entry(200, "OK", older.headers, b"n", T0 + 5, T0 + 5, "b", ("accept",), older.freshness)
    store.put("/a", newer)
    store.put("/a", older)
    assert [e.variant for e in store.variants("/a")] == ["b", "a"]


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "get", "purge"]),
        st.integers(min_value=0, max_value=30),  # key
        st.integers(min_value=0, max_value=6000),  # body size
        st.integers(min_value=0, max_value=3),  # variant
        st.integers(min_value=0, max_value=8),  # extra header lines
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@example(max_bytes=9000, max_entry=4000, ops=[("put", i, 3000, 0, 0) for i in range(6)])
@given(max_bytes=st.integers(min_value=1, max_value=40_000), max_entry=st.integers(min_value=0, max_value=8000),
       ops=operations)
def test_byte_bound_is_never_exceeded(
    max_bytes: int, max_entry: int, ops: list[tuple[str, int, int, int, int]],
) -> None:
    store = Store(max_bytes, max_entry, Clock())
    for op, key, size, variant, extra in ops:
        path = f"/k/{key}"
        if op == "put":
            stored = store.put(path, entry(body=b"b" * size, variant=str(variant), vary=("accept",), extra=extra))
            assert stored == (size <= store.max_entry and measured(
                entry(body=b"b" * size, variant=str(variant), vary=("accept",), extra=extra), path).size <= max_bytes)
        elif op == "get":
            store.variants(path)
        else:
            store.purge(f"/k/{key % 4}")
        assert 0 <= store.bytes <= max_bytes
        assert store.bytes == sum(e.size for _, e in store.items())
        assert len(store) == len(store.items())
