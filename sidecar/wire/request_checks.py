"""What a request must be before the sidecar looks for its route: never an open proxy.

- Only origin-form targets (`/path?query`): absolute-form (`GET http://elsewhere/`) and
  `*` are refused, and CONNECT is not allowed, so no caller can reach an address that is
  not in the config. The Host header only selects among configured routes.
- Paths are matched exactly as sent, without decoding or normalising. A path with a
  segment that some server resolves as `.` or `..` is refused: literal or percent-encoded
  (`%2e`), with a `;params` suffix (Tomcat and Spring drop it: `..;`), or between `%2F`,
  `%5C` or backslash separators (servers that decode them, or read a backslash as `/`).
  An upstream resolving it could land outside the prefix the route matched.
- `server.escaped_slashes: reject` refuses any `%2F` or `%5C` in the path.
- HTTP/1.0 with Transfer-Encoding has doubtful framing (RFC 9112 6.1): refused, closed.
  A transfer coding other than `chunked` alone (`gzip, chunked`) gets 501: the sidecar
  would forward the coded bytes as if they were the body.
- `server.underscore_headers: reject` refuses a header name with `_`, which some servers
  read as its `-` twin (`Content_Length`). (`drop` is done in protocol.py.)
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sidecar.config.schema import Server
from sidecar.errors import BadRequest, CallerError, MethodNotAllowed, NotImplementedCoding, UriTooLong

_HTTP11 = (1, 1)


def refusal(request: web.BaseRequest, raw_path: str, limits: Server) -> CallerError | None:
    """The error to answer instead of routing `request`, or None when it may be routed."""
    return refusal_of(request.method, raw_path, request.version, request.headers, request.body_exists, limits)


def refusal_of(
    method: str, raw_path: str, version: tuple[int, int], headers: Mapping[str, str], body_exists: bool,
    limits: Server,
) -> CallerError | None:
    """`refusal` on a request's parts: for a request answered before it became aiohttp's request."""
    if method == "CONNECT":
        return MethodNotAllowed("CONNECT is not supported: the sidecar forwards only to configured upstreams")
    if not raw_path.startswith("/"):
        return BadRequest("only origin-form request targets (/path) are accepted; this is not a forward proxy")
    if len(method) + len(raw_path) + 11 > limits.max_request_line:  # " HTTP/1.1\r\n"
        return UriTooLong(f"the request line is longer than {limits.max_request_line} bytes")
    if version < _HTTP11 and "Transfer-Encoding" in headers:
        return BadRequest("HTTP/1.0 requests cannot use Transfer-Encoding")
    # The parser frames any Transfer-Encoding that ends in chunked; only a body can have one.
    if body_exists and headers.get("Transfer-Encoding", "chunked").lower() != "chunked":
        return NotImplementedCoding("Transfer-Encoding other than chunked is not supported")
    if has_dot_segment(raw_path):
        return BadRequest("the path has a . or .. segment (or one a server would read as such); send it normalised")
    if limits.escaped_slashes == "reject" and has_escaped_slash(raw_path):
        return BadRequest("the path has an encoded slash (%2F or %5C), refused by server.escaped_slashes")
    if limits.underscore_headers == "reject" and (name := underscored_name(headers)) is not None:
        return BadRequest(f"the header name {name!r} has an underscore, refused by server.underscore_headers")
    return None


def has_dot_segment(raw_path: str) -> bool:
    path = raw_path.split("?", 1)[0]
    if "." not in path and "%" not in path:
        return False  # the usual path: no segment can be a dot segment
    path = path.lower().replace("%2e", ".")
    if "." not in path:
        return False
    for separator in ("%2f", "%5c", "\\"):
        path = path.replace(separator, "/")
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def has_escaped_slash(raw_path: str) -> bool:
    path = raw_path.split("?", 1)[0]
    return "%" in path and ("%2f" in (lower := path.lower()) or "%5c" in lower)


def underscored_name(headers: Mapping[str, str]) -> str | None:
    return next((name for name in headers if "_" in name), None)
