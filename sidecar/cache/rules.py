"""RFC 9111 rules of a shared cache as pure functions: no I/O, the clock is an argument.

Times are seconds since the epoch, the clock of the Date and Expires headers they are
compared with. Header arguments are multidict mappings (CIMultiDict and its proxy, as
the proxy hands them over); stored headers are tuples of (name, value) pairs.

What is deliberately simpler than the RFC allows (each choice errs on not serving):
  - `private="field"` and `no-cache="field"` (qualified forms) act as their plain forms;
  - HEAD responses are never stored: a HEAD is answered from a stored GET entry;
  - request `max-stale`, `min-fresh` and `only-if-cached` are ignored;
  - no heuristic freshness: a response without s-maxage, max-age or Expires is fresh for
    the route's `default_ttl` (0 by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from multidict import CIMultiDict, MultiMapping

from sidecar.wire.headers import HOP_BY_HOP

Headers = MultiMapping[str]
Fields = tuple[tuple[str, str], ...]

# RFC 9111 3 (heuristically cacheable statuses, so storable without explicit freshness)
# minus 206 (ranges), 405, 414 and 501, which issue 18 leaves out.
STORABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
LOOKUP_METHODS = frozenset({"GET", "HEAD"})
# RFC 9111 1.2.2: a delta-seconds value above 2^31 is taken as 2^31.
_DELTA_MAX = 2**31
# `name`, `name=token` or `name="quoted, string"`: quoted strings may hold commas.
_DIRECTIVE = re.compile(r'([^\s,="]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?')
_SPACES = re.compile(r"\s+")
# Request header values that are lists of case-insensitive tokens: normalised to lower
# case in the Vary key, so `GZIP, br` and `gzip,br` are one variant.
_TOKEN_LISTS = frozenset({"accept-encoding", "accept-charset", "accept-language"})
# A 304 must not change what describes the stored body (RFC 9110 15.4.5 lists what a 304
# carries; some servers send a Content-Type of their own on it anyway).
_BODY_FIELDS = frozenset({"content-length", "content-type", "content-encoding", "content-range"})
# What a 304 generated from an entry carries (RFC 9110 15.4.5), besides Age.
_NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "date", "etag", "expires", "vary",
                                  "last-modified"})
# A caller's preconditions other than If-None-Match / If-Modified-Since, and ranges: the
# cache does not evaluate them, so such requests bypass it.
UNEVALUATED_REQUEST_FIELDS = ("Range", "If-Range", "If-Match", "If-Unmodified-Since")


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The directives of Cache-Control header lines that a shared cache acts on.

    Durations are seconds; None when absent. A malformed max-age or s-maxage reads as 0
    (RFC 9111 4.2.1: invalid freshness information means stale); a malformed
    stale-if-error or stale-while-revalidate is ignored (it would only permit more).
    """

    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    max_age: float | None = None
    s_maxage: float | None = None
    stale_if_error: float | None = None
    stale_while_revalidate: float | None = None


_NO_DIRECTIVES = CacheControl()
_FLAGS = {
    "no-store": "no_store", "no-cache": "no_cache", "private": "private", "public": "public",
    "must-revalidate": "must_revalidate", "proxy-revalidate": "proxy_revalidate",
}
_FRESHNESS = {"max-age": "max_age", "s-maxage": "s_maxage"}
_PERMISSIONS = {"stale-if-error": "stale_if_error", "stale-while-revalidate": "stale_while_revalidate"}


def parse_cache_control(lines: Iterable[str]) -> CacheControl:
    """Directives from every Cache-Control line; names are case-insensitive, the first
    occurrence of a valued directive wins."""
    found: dict[str, Any] = {}
    for line in lines:
        for match in _DIRECTIVE.finditer(line):
            name, value = match.group(1).lower(), match.group(2)
            if name in _FLAGS:
                found[_FLAGS[name]] = True
            elif name in _FRESHNESS:
                found.setdefault(_FRESHNESS[name], _delta_seconds(value, 0.0))
            elif name in _PERMISSIONS:
                seconds = _delta_seconds(value, None)
                if seconds is not None:
                    found.setdefault(_PERMISSIONS[name], seconds)
    if not found:
        return _NO_DIRECTIVES
    return CacheControl(**found)


def _delta_seconds(value: str | None, invalid: float | None) -> float | None:
    if value is not None:
        value = value.strip('"')
        if value.isdigit():
            return float(min(int(value), _DELTA_MAX))
    return invalid


def request_directives(headers: Headers) -> CacheControl:
    """The request's Cache-Control; without one, `Pragma: no-cache` means no-cache (RFC 9111 5.4)."""
    lines = headers.getall("Cache-Control", ())
    if lines:
        return parse_cache_control(lines)
    if any("no-cache" in value.lower() for value in headers.getall("Pragma", ())):
        return CacheControl(no_cache=True)
    return _NO_DIRECTIVES


def http_date(value: str | None) -> float | None:
    """Seconds since the epoch of an HTTP-date; None when absent or unreadable (e.g. `0`)."""
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # asctime() dates carry no zone: an HTTP-date is always GMT
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def vary_names(headers: Headers) -> tuple[str, ...]:
    """The lower-case field names the response's Vary nominates, sorted, without repeats;
    `*` among them when present."""
    names = {
        name.strip().lower()
        for line in headers.getall("Vary", ())
        for name in line.split(",")
        if name.strip()
    }
    return tuple(sorted(names))


def variant_key(names: Sequence[str], request_headers: Headers) -> str:
    """The secondary cache key: the request's values of the fields a stored response varies on,
    normalised (RFC 9111 4.1: whitespace, line combining, case of token lists)."""
    if not names:
        return ""
    parts = []
    for name in names:
        items = (
            _SPACES.sub(" ", item.strip())
            for line in request_headers.getall(name, ())
            for item in line.split(",")
        )
        value = ",".join(item for item in items if item)
        if name in _TOKEN_LISTS:
            value = value.lower()
        parts.append(f"{name}:{value}")
    return "\n".join(parts)  # no field value holds a line break (the parser refuses them)


def storable(method: str, status: int, request_headers: Headers, response_headers: Headers) -> tuple[bool, str]:
    """Whether a shared cache may store this response, and why not (RFC 9111 3, 3.5).

    The reason is a short label for logs and metrics; "storable" when it may.
    """
    if method != "GET":
        return False, "method"  # HEAD is answered from GET entries, never stored itself
    if status not in STORABLE_STATUSES:
        return False, "status"
    if request_directives(request_headers).no_store:
        return False, "request_no_store"
    directives = parse_cache_control(response_headers.getall("Cache-Control", ()))
    if directives.no_store:
        return False, "no_store"
    if directives.private:
        return False, "private"
    if "Authorization" in request_headers and not (
        directives.public or directives.s_maxage is not None or directives.must_revalidate
    ):
        return False, "authorization"
    if "Set-Cookie" in response_headers:
        return False, "set_cookie"
    if "*" in vary_names(response_headers):
        return False, "vary_star"
    return True, "storable"


def invalidates(method: str, status: int) -> bool:
    """An unsafe method answered without error makes stored responses of its target
    invalid (RFC 9111 4.4)."""
    return method not in ("GET", "HEAD", "OPTIONS", "TRACE") and 200 <= status < 400


def stored_fields(headers: Headers) -> Fields:
    """The response's fields a cache keeps: hop-by-hop ones, those its Connection header
    names, and proxy-* are not stored (RFC 9111 3.1)."""
    dropped = HOP_BY_HOP.union(
        token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")
    )
    return tuple(
        (name, value) for name, value in headers.items()
        if (lower := name.lower()) not in dropped and not lower.startswith("proxy-")
    )


@dataclass(frozen=True, slots=True)
class Defaults:
    """The route's settings that fill in what a response leaves unsaid (seconds)."""

    default_ttl: float = 0.0
    stale_if_error: float = 0.0
    stale_while_revalidate: float = 0.0


@dataclass(frozen=True, slots=True)
class Freshness:
    """What a stored response's headers say about its use, worked out once when it is stored."""

    lifetime: float  # freshness lifetime (RFC 9111 4.2.1)
    initial_age: float  # corrected_initial_age (RFC 9111 4.2.3)
    response_time: float
    stale_if_error: float  # seconds past expiry during which an upstream failure may be answered with it
    stale_while_revalidate: float  # seconds past expiry during which it is served while being refreshed
    etag: str | None
    last_modified: str | None

    def age(self, now: float) -> float:
        """current_age (RFC 9111 4.2.3): the initial age plus the time it has been stored."""
        return self.initial_age + max(0.0, now - self.response_time)

    def staleness(self, now: float) -> float:
        """Seconds past expiry; negative while fresh."""
        return self.age(now) - self.lifetime

    @property
    def has_validator(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    @property
    def useless_after(self) -> float:
        """The time after which the entry can answer nothing: not fresh, not stale-served, and no
        validator to revalidate it with."""
        if self.has_validator:
            return math.inf
        expires = self.response_time + self.lifetime - self.initial_age
        return expires + max(self.stale_if_error, self.stale_while_revalidate)


def freshness_lifetime(directives: CacheControl, headers: Headers, response_time: float, default_ttl: float) -> float:
    """s-maxage, else max-age, else Expires minus Date, else the route's default (RFC 9111 4.2.1).

    An Expires that cannot be read (`0`, garbage) is in the past (RFC 9111 5.3); a missing
    Date is the time the response arrived.
    """
    if directives.no_cache:
        return 0.0  # stored, but every use needs a revalidation (RFC 9111 5.2.2.4)
    if directives.s_maxage is not None:
        return directives.s_maxage
    if directives.max_age is not None:
        return directives.max_age
    expires_lines = headers.getall("Expires", ())
    if expires_lines:
        expires = http_date(expires_lines[0])
        if expires is None:
            return 0.0
        return max(0.0, expires - date_value(headers, response_time))
    return default_ttl


def date_value(headers: Headers, response_time: float) -> float:
    date = http_date(headers.get("Date"))
    return response_time if date is None else date


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """corrected_initial_age (RFC 9111 4.2.3) from the Age and Date headers and the times
    the request left and the response arrived."""
    age_line = headers.get("Age", "").strip()
    age_value = float(min(int(age_line), _DELTA_MAX)) if age_line.isdigit() else 0.0
    apparent_age = max(0.0, response_time - date_value(headers, response_time))
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value + response_delay)


def freshness(headers: Headers, request_time: float, response_time: float, defaults: Defaults) -> Freshness:
    """Everything later decisions need from a response's headers.

    Stale windows: the response's own stale-if-error / stale-while-revalidate win over the
    route's defaults. must-revalidate, proxy-revalidate and no-cache forbid serving stale
    at all (RFC 9111 4.2.4, 5.2.2.2). s-maxage carries proxy-revalidate for a shared cache
    (5.2.2.10), so the route's defaults do not apply to it, but the response's own stale
    directives still do: that is the origin's explicit permission (RFC 5861), and the
    usual CDN idiom `s-maxage=60, stale-if-error=86400`.
    """
    directives = parse_cache_control(headers.getall("Cache-Control", ()))
    if directives.must_revalidate or directives.proxy_revalidate or directives.no_cache:
        if_error = while_revalidating = 0.0
    else:
        implicit = 0.0 if directives.s_maxage is not None else None
        if_error = _first(directives.stale_if_error, implicit, defaults.stale_if_error)
        while_revalidating = _first(directives.stale_while_revalidate, implicit, defaults.stale_while_revalidate)
    return Freshness(
        lifetime=freshness_lifetime(directives, headers, response_time, defaults.default_ttl),
        initial_age=initial_age(headers, request_time, response_time),
        response_time=response_time,
        stale_if_error=if_error,
        stale_while_revalidate=while_revalidating,
        etag=headers.get("ETag"),
        last_modified=headers.get("Last-Modified"),
    )


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0


def fresh_for(request: CacheControl, stored: Freshness, now: float) -> bool:
    """Whether a stored response may answer this request without contacting the upstream."""
    if request.no_cache:
        return False
    age = stored.age(now)
    if request.max_age is not None and age > request.max_age:
        return False
    return age < stored.lifetime


def revalidation_fields(stored: Freshness) -> list[tuple[str, str]]:
    """The conditional request fields that ask the upstream whether the entry still holds
    (RFC 9111 4.3.1)."""
    fields = []
    if stored.etag is not None:
        fields.append(("If-None-Match", stored.etag))
    if stored.last_modified is not None:
        fields.append(("If-Modified-Since", stored.last_modified))
    return fields


def _opaque(tag: str) -> str:
    """The entity-tag without its weakness mark, for the weak comparison (RFC 9110 8.8.3.2)."""
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def caller_conditional_matches(request_headers: Headers, stored: Freshness) -> bool:
    """Whether the caller's own If-None-Match or If-Modified-Since is satisfied by the stored
    response, so a 304 answers it (RFC 9110 13.1.2, 13.1.3, 13.2.2)."""
    none_match = request_headers.getall("If-None-Match", ())
    if none_match:  # when present, If-Modified-Since is ignored
        if stored.etag is None:
            return False
        ours = _opaque(stored.etag)
        tags = (tag for line in none_match for tag in line.split(","))
        return any(tag.strip() == "*" or _opaque(tag) == ours for tag in tags)
    since = http_date(request_headers.get("If-Modified-Since"))
    modified = http_date(stored.last_modified)
    return since is not None and modified is not None and modified <= since


def selected_by(stored: Freshness, not_modified: Headers) -> bool:
    """Whether a 304 is about this stored response (RFC 9111 4.3.4): its validators match, or it
    carries none (we asked about exactly this one)."""
    etag = not_modified.get("ETag")
    if etag is not None:
        return stored.etag is not None and etag.strip() == stored.etag.strip()
    last_modified = not_modified.get("Last-Modified")
    if last_modified is not None:
        return stored.last_modified is not None and http_date(last_modified) == http_date(stored.last_modified)
    return True


def updated_fields(stored: Fields, not_modified: Headers) -> Fields:
    """A stored response's fields after a 304 (RFC 9111 3.2, 4.3.4): every field the 304 carries
    replaces the stored lines of that name, except what describes the body (Content-Length,
    Content-Type, Content-Encoding, Content-Range) and what is not stored at all."""
    incoming = [
        (name, value) for name, value in stored_fields(not_modified)
        if name.lower() not in _BODY_FIELDS
    ]
    replaced = {name.lower() for name, _ in incoming}
    kept = [(name, value) for name, value in stored if name.lower() not in replaced]
    return (*kept, *incoming)


def not_modified_fields(stored: Fields) -> Fields:
    """The fields of a 304 generated from a stored response (RFC 9110 15.4.5)."""
    return tuple((name, value) for name, value in stored if name.lower() in _NOT_MODIFIED_FIELDS)


def as_headers(fields: Fields) -> CIMultiDict[str]:
    return CIMultiDict(fields)
