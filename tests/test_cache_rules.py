"""RFC 9111 rules of the cache (sidecar/cache/rules.py and policy.py), table by table.

Times are a fake clock: plain epoch seconds passed in, T0 being the Date below.
"""

from __future__ import annotations

from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from sidecar.cache import rules
from sidecar.cache.policy import Action, decide, stale_reason
from sidecar.cache.rules import CacheControl, Defaults
from sidecar.cache.store import Entry

T0 = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
NO_DEFAULTS = Defaults()


def at(seconds: float) -> str:
    """An HTTP-date `seconds` after T0."""
    return formatdate(T0 + seconds, usegmt=True)


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def entry(*pairs: tuple[str, str], request: CIMultiDict[str] | None = None, request_time: float = T0,
          response_time: float = T0, defaults: Defaults = NO_DEFAULTS, body: bytes = b"body") -> Entry:
    headers = h(*pairs)
    vary = rules.vary_names(headers)
    return Entry(
        200, "OK", rules.stored_fields(headers), body, request_time, response_time,
        rules.variant_key(vary, request or h()), vary,
        rules.freshness(headers, request_time, response_time, defaults),
    )


# --- Cache-Control parsing -------------------------------------------------------------

@pytest.mark.parametrize(("lines", "expected"), [
    ([], CacheControl()),
    (["max-age=60"], CacheControl(max_age=60)),
    (["Max-Age=60, PUBLIC"], CacheControl(max_age=60, public=True)),
    (["max-age=60", "s-maxage=30"], CacheControl(max_age=60, s_maxage=30)),  # lines combine
    (["max-age=60, max-age=5"], CacheControl(max_age=60)),  # the first occurrence wins
    (['max-age="60"'], CacheControl(max_age=60)),
    (["max-age=abc"], CacheControl(max_age=0)),  # invalid freshness: stale
    (["max-age=-1"], CacheControl(max_age=0)),
    (["max-age"], CacheControl(max_age=0)),
    (["max-age=99999999999"], CacheControl(max_age=2**31)),
    (['private="Set-Cookie, X-Foo", max-age=5'], CacheControl(private=True, max_age=5)),  # comma in quotes
    (['no-cache="Set-Cookie"'], CacheControl(no_cache=True)),
    (["no-store"], CacheControl(no_store=True)),
    (["must-revalidate, proxy-revalidate"], CacheControl(must_revalidate=True, proxy_revalidate=True)),
    (["stale-if-error=600, stale-while-revalidate=30"], CacheControl(stale_if_error=600, stale_while_revalidate=30)),
    (["stale-if-error=soon"], CacheControl()),  # a malformed permission is ignored, not zero
    ([" , ,max-age=1,, "], CacheControl(max_age=1)),
    (["community=UCI, max-age=1"], CacheControl(max_age=1)),  # unknown extensions are ignored
])
def test_cache_control_parsing(lines: list[str], expected: CacheControl) -> None:
    assert rules.parse_cache_control(lines) == expected


@pytest.mark.parametrize(("headers", "no_cache", "no_store"), [
    (h(("Cache-Control", "no-cache")), True, False),
    (h(("Cache-Control", "no-store")), False, True),
    (h(("Pragma", "no-cache")), True, False),  # Pragma counts only without Cache-Control
    (h(("Pragma", "no-cache"), ("Cache-Control", "max-age=5")), False, False),
    (h(), False, False),
])
def test_request_directives(headers: CIMultiDict[str], no_cache: bool, no_store: bool) -> None:
    directives = rules.request_directives(headers)
    assert (directives.no_cache, directives.no_store) == (no_cache, no_store)


# --- what is stored ---------------------------------------------------------------------

AUTH = h(("Authorization", "Bearer x"))


@pytest.mark.parametrize(("method", "status", "asked", "response", "expected"), [
    ("GET", 200, h(), h(), (True, "storable")),
    *[("GET", status, h(), h(), (True, "storable")) for status in (203, 204, 300, 301, 308, 404, 410)],
    *[("GET", status, h(), h(("Cache-Control", "max-age=60")), (False, "status"))
      for status in (201, 206, 302, 304, 307, 400, 403, 405, 500, 502, 503)],
    ("HEAD", 200, h(), h(("Cache-Control", "max-age=60")), (False, "method")),
    ("POST", 200, h(), h(("Cache-Control", "max-age=60")), (False, "method")),
    ("GET", 200, h(("Cache-Control", "no-store")), h(), (False, "request_no_store")),
    ("GET", 200, h(), h(("Cache-Control", "no-store, max-age=60")), (False, "no_store")),
    ("GET", 200, h(), h(("Cache-Control", "private, max-age=60")), (False, "private")),
    ("GET", 200, h(), h(("Cache-Control", 'private="X-Token", max-age=60')), (False, "private")),
    ("GET", 200, AUTH, h(("Cache-Control", "max-age=60")), (False, "authorization")),
    ("GET", 200, AUTH, h(), (False, "authorization")),
    ("GET", 200, AUTH, h(("Cache-Control", "public, max-age=60")), (True, "storable")),
    ("GET", 200, AUTH, h(("Cache-Control", "s-maxage=60")), (True, "storable")),
    ("GET", 200, AUTH, h(("Cache-Control", "must-revalidate, max-age=60")), (True, "storable")),
    ("GET", 200, h(), h(("Set-Cookie", "id=1"), ("Cache-Control", "public, max-age=60")), (False, "set_cookie")),
    ("GET", 200, h(), h(("Vary", "Accept, *")), (False, "vary_star")),
    ("GET", 200, h(), h(("Vary", "Accept-Encoding")), (True, "storable")),
    ("GET", 200, h(), h(("Cache-Control", "no-cache")), (True, "storable")),  # stored, always revalidated
])
def test_storable(method: str, status: int, asked: CIMultiDict[str], response: CIMultiDict[str],
                  expected: tuple[bool, str]) -> None:
    assert rules.storable(method, status, asked, response) == expected


def test_stored_fields_drop_hop_by_hop_and_connection_named() -> None:
    headers = h(("Content-Type", "text/plain"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Proxy-Authenticate", "Basic"),
                ("ETag", '"a"'))
    assert rules.stored_fields(headers) == (("Content-Type", "text/plain"), ("ETag", '"a"'))


@pytest.mark.parametrize(("method", "status", "expected"), [
    ("POST", 200, True), ("PUT", 204, True), ("DELETE", 302, True), ("PATCH", 200, True),
    ("POST", 400, False), ("DELETE", 500, False), ("GET", 200, False), ("HEAD", 200, False),
])
def test_unsafe_methods_invalidate(method: str, status: int, expected: bool) -> None:
    assert rules.invalidates(method, status) is expected


# --- freshness lifetime and age ---------------------------------------------------------

@pytest.mark.parametrize(("response", "default_ttl", "lifetime"), [
    (h(("Cache-Control", "max-age=60")), 0, 60),
    (h(("Cache-Control", "max-age=60, s-maxage=300")), 0, 300),  # s-maxage first for a shared cache
    (h(("Cache-Control", "max-age=60"), ("Expires", at(9999)), ("Date", DATE)), 0, 60),  # max-age over Expires
    (h(("Expires", at(120)), ("Date", DATE)), 0, 120),
    (h(("Expires", at(-10)), ("Date", DATE)), 0, 0),  # in the past: stale at once
    (h(("Expires", "0"), ("Date", DATE)), 30, 0),  # unreadable Expires is in the past, not the default
    (h(("Expires", at(50))), 0, 50),  # no Date: the time the response arrived (T0)
    (h(), 0, 0),
    (h(), 45, 45),  # nothing said: the route's default_ttl
    (h(("Cache-Control", "no-cache, max-age=60")), 0, 0),  # no-cache: every use is revalidated
])
def test_freshness_lifetime(response: CIMultiDict[str], default_ttl: float, lifetime: float) -> None:
    directives = rules.parse_cache_control(response.getall("Cache-Control", ()))
    assert rules.freshness_lifetime(directives, response, T0, default_ttl) == lifetime


@pytest.mark.parametrize(("response", "request_time", "response_time", "expected"), [
    (h(("Date", DATE)), T0, T0, 0),
    (h(("Date", DATE), ("Age", "30")), T0, T0, 30),
    (h(("Date", DATE), ("Age", "30")), T0 - 2, T0, 32),  # Age plus the response delay
    (h(("Date", at(-100))), T0, T0, 100),  # apparent age from Date
    (h(("Date", at(-100)), ("Age", "10")), T0, T0, 100),  # the larger of the two estimates
    (h(("Date", at(+100))), T0, T0, 0),  # an upstream clock ahead: no negative age
    (h(("Age", "junk")), T0, T0, 0),
    (h(), T0 - 1, T0, 1),  # no Date: its arrival; the request's round trip counts
])
def test_initial_age(response: CIMultiDict[str], request_time: float, response_time: float, expected: float) -> None:
    assert rules.initial_age(response, request_time, response_time) == expected


def test_current_age_grows_with_resident_time() -> None:
    stored = entry(("Date", DATE), ("Age", "30"), ("Cache-Control", "max-age=60")).freshness
    assert [stored.age(T0 + dt) for dt in (0, 10, 29, 30)] == [30, 40, 59, 60]
    assert [stored.staleness(T0 + dt) for dt in (0, 30, 40)] == [-30, 0, 10]


# --- stale windows ----------------------------------------------------------------------

ROUTE = Defaults(default_ttl=0, stale_if_error=300, stale_while_revalidate=20)


@pytest.mark.parametrize(("cache_control", "if_error", "while_revalidating"), [
    ("max-age=60", 300, 20),  # the route's defaults
    ("max-age=60, stale-if-error=30", 30, 20),  # the response's own directive wins
    ("max-age=60, stale-while-revalidate=5", 300, 5),
    ("max-age=60, stale-if-error=0", 0, 20),
    ("max-age=60, must-revalidate, stale-if-error=30", 0, 0),  # never stale
    ("max-age=60, proxy-revalidate", 0, 0),
    ("no-cache", 0, 0),
    ("s-maxage=60", 0, 0),  # s-maxage implies proxy-revalidate: no defaults...
    ("s-maxage=60, stale-if-error=86400", 86400, 0),  # ...but the origin's explicit permission stands
])
def test_stale_windows(cache_control: str, if_error: float, while_revalidating: float) -> None:
    stored = entry(("Cache-Control", cache_control), defaults=ROUTE).freshness
    assert (stored.stale_if_error, stored.stale_while_revalidate) == (if_error, while_revalidating)


# --- decisions --------------------------------------------------------------------------

VALIDATED = (("Cache-Control", "max-age=60"), ("ETag", '"v1"'), ("Date", DATE))
UNVALIDATED = (("Cache-Control", "max-age=60"), ("Date", DATE))


@pytest.mark.parametrize(("method", "asked", "stored", "now", "action", "reason"), [
    ("GET", h(), None, T0, Action.FETCH, "no_entry"),
    ("GET", h(), VALIDATED, T0 + 59, Action.SERVE, "fresh"),
    ("HEAD", h(), VALIDATED, T0 + 59, Action.SERVE, "fresh"),  # HEAD from the GET's entry
    ("GET", h(), VALIDATED, T0 + 60, Action.REVALIDATE, "stale"),
    ("GET", h(), UNVALIDATED, T0 + 60, Action.FETCH, "stale"),
    ("GET", h(("Cache-Control", "no-cache")), VALIDATED, T0, Action.REVALIDATE, "request_no_cache"),
    ("GET", h(("Pragma", "no-cache")), UNVALIDATED, T0, Action.FETCH, "request_no_cache"),
    ("GET", h(("Cache-Control", "max-age=10")), VALIDATED, T0 + 11, Action.REVALIDATE, "stale"),
    ("GET", h(("Cache-Control", "max-age=10")), VALIDATED, T0 + 10, Action.SERVE, "fresh"),
    ("GET", h(("Cache-Control", "no-store")), VALIDATED, T0, Action.BYPASS, "request_no_store"),
    ("GET", h(("Range", "bytes=0-1")), VALIDATED, T0, Action.BYPASS, "range"),
    ("GET", h(("If-Match", '"v1"')), VALIDATED, T0, Action.BYPASS, "if-match"),
    ("POST", h(), VALIDATED, T0, Action.BYPASS, "method"),
    ("DELETE", h(), VALIDATED, T0, Action.BYPASS, "method"),
])
def test_decide(method: str, asked: CIMultiDict[str], stored: tuple[tuple[str, str], ...] | None, now: float,
                action: Action, reason: str) -> None:
    entries = [] if stored is None else [entry(*stored)]
    decision = decide(method, asked, entries, now)
    assert (decision.action, decision.reason) == (action, reason)


def test_a_get_with_a_body_bypasses() -> None:
    stored = entry(*VALIDATED)
    decision = decide("GET", h(), [stored], T0, has_body=True)
    assert (decision.action, decision.reason) == (Action.BYPASS, "request_body")


def test_a_websocket_handshake_bypasses_even_a_fresh_entry() -> None:
    stored = entry(*VALIDATED)
    assert decide("GET", h(), [stored], T0).action is Action.SERVE
    decision = decide("GET", h(), [stored], T0, upgrade=True)
    assert (decision.action, decision.reason) == (Action.BYPASS, "upgrade")


def test_stale_while_revalidate_window() -> None:
    stored = entry(("Cache-Control", "max-age=60, stale-while-revalidate=30"), ("ETag", '"v1"'), ("Date", DATE))
    assert decide("GET", h(), [stored], T0 + 59).action is Action.SERVE
    assert decide("GET", h(), [stored], T0 + 60).action is Action.SERVE_STALE
    assert decide("GET", h(), [stored], T0 + 90).action is Action.SERVE_STALE
    assert decide("GET", h(), [stored], T0 + 91).action is Action.REVALIDATE
    # A caller that asks for no-cache is never given the stale copy.
    assert decide("GET", h(("Cache-Control", "no-cache")), [stored], T0 + 70).action is Action.REVALIDATE


def test_no_stale_while_revalidate_by_default() -> None:
    stored = entry(("Cache-Control", "max-age=60"), ("ETag", '"v1"'), ("Date", DATE))
    assert decide("GET", h(), [stored], T0 + 60).action is Action.REVALIDATE


@pytest.mark.parametrize(("kind", "status", "after", "expected"), [
    ("connect_failure", None, 60 + 300, "connect_failure"),
    ("upstream_reset", None, 100, "upstream_reset"),
    ("timeout", None, 100, "timeout"),
    ("circuit_open", None, 100, "circuit_open"),
    ("overloaded", None, 100, "overloaded"),
    ("connect_failure", None, 60 + 301, None),  # past the stale-if-error window
    ("bad_request", None, 100, None),  # not an upstream failure
    ("bad_upstream_response", None, 100, None),
    (None, 500, 100, "status_500"),
    (None, 502, 100, "status_502"),
    (None, 503, 100, "status_503"),
    (None, 504, 100, "status_504"),
    (None, 501, 100, None),
    (None, 429, 100, None),
    (None, 200, 100, None),
])
def test_stale_if_error(kind: str | None, status: int | None, after: float, expected: str | None) -> None:
    stored = entry(("Cache-Control", "max-age=60"), ("Date", DATE), defaults=Defaults(stale_if_error=300))
    assert stale_reason(stored, T0 + after, kind, status) == expected


def test_stale_if_error_window_of_the_response_wins() -> None:
    stored = entry(("Cache-Control", "max-age=60, stale-if-error=10"), defaults=Defaults(stale_if_error=300))
    assert stale_reason(stored, T0 + 70, "timeout") == "timeout"
    assert stale_reason(stored, T0 + 71, "timeout") is None


def test_must_revalidate_is_never_served_stale() -> None:
    stored = entry(("Cache-Control", "max-age=60, must-revalidate"), defaults=Defaults(stale_if_error=300))
    assert stale_reason(stored, T0 + 59, "timeout") == "timeout"  # still fresh: fine
    assert stale_reason(stored, T0 + 61, "timeout") is None


# --- Vary -------------------------------------------------------------------------------

def test_vary_names_are_normalised() -> None:
    assert rules.vary_names(h(("Vary", "Accept-Encoding, accept"), ("Vary", " ACCEPT-encoding "))) == (
        "accept", "accept-encoding")
    assert rules.vary_names(h()) == ()
    assert "*" in rules.vary_names(h(("Vary", "Accept, *")))


@pytest.mark.parametrize(("first", "second", "same"), [
    (h(("Accept-Encoding", "gzip")), h(("Accept-Encoding", "gzip")), True),
    (h(("Accept-Encoding", "gzip, br")), h(("Accept-Encoding", "GZIP,br")), True),  # tokens: case, spaces
    (h(("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")), h(("Accept-Encoding", "gzip, br")), True),
    (h(("Accept-Encoding", "gzip")), h(("Accept-Encoding", "br")), False),
    (h(("Accept-Encoding", "gzip")), h(), False),
    (h(), h(("Accept-Encoding", "")), True),
    (h(("Accept-Encoding", "gzip"), ("X-Other", "1")), h(("Accept-Encoding", "gzip"), ("X-Other", "2")), True),
])
def test_variant_key(first: CIMultiDict[str], second: CIMultiDict[str], same: bool) -> None:
    names = ("accept-encoding",)
    assert (rules.variant_key(names, first) == rules.variant_key(names, second)) is same


def test_accept_encoding_variants_stay_apart() -> None:
    gzip = entry(("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding"), ("Content-Encoding", "gzip"),
                 request=h(("Accept-Encoding", "gzip")), body=b"gz", response_time=T0 + 1)
    plain = entry(("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding"),
                  request=h(), body=b"plain")
    stored = [gzip, plain]
    assert decide("GET", h(("Accept-Encoding", "gzip")), stored, T0 + 2).entry is gzip
    assert decide("GET", h(("Accept-Encoding", "GZIP")), stored, T0 + 2).entry is gzip
    assert decide("GET", h(), stored, T0 + 2).entry is plain
    miss = decide("GET", h(("Accept-Encoding", "br")), stored, T0 + 2)
    assert (miss.action, miss.entry) == (Action.FETCH, None)


# --- validators and conditionals --------------------------------------------------------

@pytest.mark.parametrize(("stored", "expected"), [
    ((("ETag", '"v1"'),), [("If-None-Match", '"v1"')]),
    ((("Last-Modified", DATE),), [("If-Modified-Since", DATE)]),
    ((("ETag", 'W/"v1"'), ("Last-Modified", DATE)), [("If-None-Match", 'W/"v1"'), ("If-Modified-Since", DATE)]),
    ((), []),
])
def test_revalidation_fields(stored: tuple[tuple[str, str], ...], expected: list[tuple[str, str]]) -> None:
    assert rules.revalidation_fields(entry(*stored).freshness) == expected


@pytest.mark.parametrize(("asked", "stored", "matches"), [
    (h(("If-None-Match", '"v1"')), (("ETag", '"v1"'),), True),
    (h(("If-None-Match", '"v0", "v1"')), (("ETag", '"v1"'),), True),
    (h(("If-None-Match", 'W/"v1"')), (("ETag", '"v1"'),), True),  # weak comparison
    (h(("If-None-Match", '"v1"')), (("ETag", 'W/"v1"'),), True),
    (h(("If-None-Match", "*")), (("ETag", '"v1"'),), True),
    (h(("If-None-Match", '"v2"')), (("ETag", '"v1"'),), False),
    (h(("If-None-Match", '"v1"')), (), False),
    # If-None-Match decides alone when present, even if If-Modified-Since would match
    (h(("If-None-Match", '"v2"'), ("If-Modified-Since", at(10))), (("ETag", '"v1"'), ("Last-Modified", DATE)),
     False),
    (h(("If-Modified-Since", DATE)), (("Last-Modified", DATE),), True),
    (h(("If-Modified-Since", at(10))), (("Last-Modified", DATE),), True),
    (h(("If-Modified-Since", at(-10))), (("Last-Modified", DATE),), False),
    (h(("If-Modified-Since", "yesterday")), (("Last-Modified", DATE),), False),
    (h(("If-Modified-Since", DATE)), (), False),
    (h(), (("ETag", '"v1"'),), False),
])
def test_caller_conditional(asked: CIMultiDict[str], stored: tuple[tuple[str, str], ...], matches: bool) -> None:
    assert rules.caller_conditional_matches(asked, entry(*stored).freshness) is matches


@pytest.mark.parametrize(("not_modified", "selected"), [
    (h(("ETag", '"v1"')), True),
    (h(("ETag", '"v2"')), False),
    (h(("Last-Modified", DATE)), True),
    (h(("Last-Modified", at(5))), False),
    (h(), True),  # no validator: it answers the one request we sent about this entry
])
def test_304_selects_the_entry(not_modified: CIMultiDict[str], selected: bool) -> None:
    stored = entry(("ETag", '"v1"'), ("Last-Modified", DATE)).freshness
    assert rules.selected_by(stored, not_modified) is selected


def test_304_updates_stored_headers() -> None:
    stored = (
        ("Content-Type", "text/plain"), ("Content-Length", "4"), ("Cache-Control", "max-age=60"),
        ("ETag", '"v1"'), ("Date", DATE), ("X-Old", "kept"), ("Link", "<a>"), ("Link", "<b>"),
    )
    not_modified = h(
        ("Cache-Control", "max-age=120"), ("Date", at(100)), ("ETag", '"v1"'),
        ("Content-Length", "0"), ("Content-Type", "text/html"),  # never overwrite the body's description
        ("Link", "<c>"), ("X-New", "added"), ("Connection", "close"), ("Keep-Alive", "timeout=5"),
    )
    updated = rules.updated_fields(stored, not_modified)
    assert updated == (
        ("Content-Type", "text/plain"), ("Content-Length", "4"), ("X-Old", "kept"),
        ("Cache-Control", "max-age=120"), ("Date", at(100)), ("ETag", '"v1"'), ("Link", "<c>"), ("X-New", "added"),
    )
    # The refreshed freshness: new lifetime, age counted from the 304's Date.
    refreshed = rules.freshness(CIMultiDict(updated), T0 + 100, T0 + 100, Defaults())
    assert refreshed.lifetime == 120
    assert refreshed.age(T0 + 150) == 50


def test_not_modified_fields() -> None:
    stored = (("Content-Type", "text/plain"), ("Content-Length", "4"), ("ETag", '"v1"'), ("Date", DATE),
              ("Cache-Control", "max-age=60"), ("Vary", "Accept"), ("X-App", "1"))
    assert rules.not_modified_fields(stored) == (
        ("ETag", '"v1"'), ("Date", DATE), ("Cache-Control", "max-age=60"), ("Vary", "Accept"))


@pytest.mark.parametrize(("value", "expected"), [
    (DATE, T0),
    ("Sunday, 06-Nov-94 08:49:37 GMT", T0),  # RFC 850, obsolete but to be accepted
    ("Sun Nov  6 08:49:37 1994", T0),  # asctime, no zone: GMT
    ("0", None), ("", None), (None, None), ("Sun, 99 Nov 1994 08:49:37 GMT", None),
])
def test_http_date(value: str | None, expected: float | None) -> None:
    assert rules.http_date(value) == expected


@pytest.mark.parametrize(("stored", "useless_after"), [
    ((("Cache-Control", "max-age=60"),), T0 + 60 + 300),  # lifetime, then the stale-if-error window
    ((("Cache-Control", "max-age=60"), ("Age", "50")), T0 + 10 + 300),
    ((("Cache-Control", "max-age=60"), ("ETag", '"v"')), float("inf")),  # kept to revalidate
])
def test_useless_after(stored: tuple[tuple[str, str], ...], useless_after: float) -> None:
    assert entry(*stored, defaults=Defaults(stale_if_error=300)).freshness.useless_after == useless_after
