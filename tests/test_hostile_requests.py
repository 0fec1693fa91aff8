"""What the sidecar accepts from callers: request lines, framing, paths, header names and our own headers.

Every refusal is a JSON answer naming what was wrong, nothing reaches the upstream, and no
traceback is logged. Requests are written as raw bytes, so the test controls every byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Awaitable, Callable

import pytest

from sidecar.config import parse_config
from tests.conftest import SidecarFactory, Upstream, raw_exchange, route_yaml, with_test_listeners


def answer_parts(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    """Status line, headers (lower-case names) and body of one raw answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status_line, headers, body


def assert_refused(answer: bytes, status: int, kind: str, *mentions: str) -> None:
    status_line, headers, body = answer_parts(answer)
    assert status_line.startswith(f"HTTP/1.1 {status} "), answer[:200]
    assert headers.get("x-sidecar-error") == kind
    message = json.loads(body)["message"]
    for mention in mentions:
        assert mention in message, message


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


# A slow sender is closed quietly (issue 15, item 3).

async def test_slow_header_senders_are_closed_without_a_logged_error(
    sidecar_factory: SidecarFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await sidecar_factory("server: {header_timeout: 200ms}\n" + route_yaml(upstream.url))
    slow = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    for _reader, writer in slow:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    async with asyncio.timeout(5):
        assert [await reader.read() for reader, _ in slow] == [b""] * 3  # closed by the sidecar
    for _, writer in slow:
        writer.close()
    assert errors_logged(caplog) == []
    assert upstream.hits == []


# Our own request headers, malformed (issue 15, item 4).

@pytest.mark.parametrize(("name", "value"), [
    ("x-sidecar-max-attempts", "\u00b2"),  # a superscript two: str.isdigit() says yes
    ("x-sidecar-max-attempts", "7" * 5000),  # over Python's int-from-text digit limit
    ("x-sidecar-timeout-ms", "1" + "0" * 400),  # too large for a float
    ("x-sidecar-timeout-ms", "1" * 16),  # one digit over the documented bound
    ("x-sidecar-timeout-ms", "\u0661\u0660"),  # Arabic-Indic digits
    ("x-sidecar-max-attempts", "+3"),
], ids=["superscript", "5000-digits", "float-overflow", "16-digits", "arabic-indic", "signed"])
async def test_malformed_caller_limits_get_400_naming_the_header(
    sidecar_factory: SidecarFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = f"GET /x HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\nConnection: close\r\n\r\n".encode()
    answer = await raw_exchange(proxy.port, request)
    assert_refused(answer, 400, "bad_request", name)
    assert len(answer) < 1000  # a huge value is not echoed back whole
    assert upstream.hits == []
    assert errors_logged(caplog) == []


async def test_large_but_well_formed_caller_limits_are_capped_by_the_route(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = (b"GET /x HTTP/1.1\r\nHost: x\r\nx-sidecar-timeout-ms: 999999999999999\r\n"
               b"x-sidecar-max-attempts: 000000000000009\r\nConnection: close\r\n\r\n")
    assert (await raw_exchange(proxy.port, request)).startswith(b"HTTP/1.1 200 ")
    assert len(upstream.hits) == 1


# The request line's version, and the version of our answers (issue 15 item 5a, issue 14 item 7).

@pytest.mark.parametrize(("request_line", "status", "kind"), [
    (b"GET /x HTTP/2.0", 505, "http_version_not_supported"),
    (b"GET /x HTTP/3.0", 505, "http_version_not_supported"),  # the C parser refuses it itself
    (b"GET /x HTTP/1.2", 505, "http_version_not_supported"),
    (b"GET /x", 400, "bad_request"),  # HTTP/0.9: no version at all
    (b"GET /x HTTP/0.9", 400, "bad_request"),
], ids=["http2", "http3", "http12", "no-version", "http09"])
async def test_request_lines_other_than_http1_are_refused_and_closed(
    sidecar_factory: SidecarFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture,
    request_line: bytes, status: int, kind: str,
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    # No Connection: close: raw_exchange returns only because the sidecar closes.
    answer = await raw_exchange(proxy.port, request_line + b"\r\nHost: x\r\n\r\n")
    assert_refused(answer, status, kind)
    assert upstream.hits == []
    assert errors_logged(caplog) == []


async def test_http2_prior_knowledge_preface_is_refused(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert_refused(answer, 400, "bad_request")  # both parsers refuse the `*` target first
    assert upstream.hits == []


async def test_unparsable_requests_are_answered_in_http11(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    answer = await raw_exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    assert_refused(answer, 400, "bad_request")
    assert upstream.hits == []


async def test_http10_requests_are_still_served(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    assert (await raw_exchange(proxy.port, b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.0 200 ")
    assert [hit.target for hit in upstream.hits] == ["/x"]


# Transfer codings other than chunked (issue 15, item 5b).

@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"x-custom ,  chunked"])
async def test_transfer_codings_other_than_chunked_get_501_and_are_closed(
    sidecar_factory: SidecarFactory, upstream: Upstream, coding: bytes
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    answer = await raw_exchange(proxy.port, request)
    assert_refused(answer, 501, "not_implemented", "Transfer-Encoding")
    assert upstream.hits == []


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked"])
async def test_chunked_alone_is_forwarded(sidecar_factory: SidecarFactory, upstream: Upstream, coding: bytes) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    request = (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding
               + b"\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert (await raw_exchange(proxy.port, request)).startswith(b"HTTP/1.1 200 ")
    assert [hit.body for hit in upstream.hits] == [b"abc"]


# Segments other servers resolve as `.` or `..`, and encoded slashes (issue 15, item 5c).

Upstreams = Callable[[str], Awaitable[Upstream]]


async def public_and_internal(sidecar_factory: SidecarFactory, upstream_factory: Upstreams, server: str = ""
                              ) -> tuple[int, Upstream, Upstream]:
    public = await upstream_factory("public")
    internal = await upstream_factory("internal")
    proxy = await sidecar_factory(server + textwrap.dedent(f"""
        upstreams:
          public: {{endpoints: ["{public.url}"]}}
          internal: {{endpoints: ["{internal.url}"]}}
        routes:
          - {{name: public, match: {{path_prefix: /api/}}, upstream: public}}
          - {{name: internal, match: {{path_prefix: /internal/}}, upstream: internal}}
    """))
    return proxy.port, public, internal


@pytest.mark.parametrize("path", [
    "/api/..;/internal/x", "/api/..;jsessionid=1/internal/x", "/api/%2e%2E;x=y/internal/x", "/api/.;/x",
    "/api/..%2finternal/x", "/api/..%2Finternal/x", "/api/x%2f..%2f..%2finternal/x", "/api/..%5cinternal/x",
    "/api/..%5Cinternal/x", "/api/..\\internal/x", "/api/x\\..\\..\\internal/x", "/api/%2e\\x",
])
async def test_dot_segments_in_the_shapes_other_servers_resolve_are_refused(
    sidecar_factory: SidecarFactory, upstream_factory: Upstreams, path: str
) -> None:
    port, public, internal = await public_and_internal(sidecar_factory, upstream_factory)
    answer = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_refused(answer, 400, "bad_request", "segment")
    assert public.hits == [] and internal.hits == []


@pytest.mark.parametrize("path", [
    "/api/a;b=c/d", "/api/a%2Fb", "/api/a%2fb", "/api/a%5Cb", "/api/..x;y/z", "/api/x.;/y", "/api/a;/..b",
    "/api/q?next=/../x%2F",
])
async def test_paths_with_params_and_encoded_slashes_are_forwarded_as_sent_by_default(
    sidecar_factory: SidecarFactory, upstream_factory: Upstreams, path: str
) -> None:
    port, public, internal = await public_and_internal(sidecar_factory, upstream_factory)
    answer = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert [hit.target for hit in public.hits] == [path] and internal.hits == []


@pytest.mark.parametrize(("path", "status"), [
    ("/api/a%2Fb", 400), ("/api/a%2fb", 400), ("/api/a%5Cb", 400), ("/api/a%5cb", 400),
    ("/api/a/b?next=%2F", 200), ("/api/a%20b", 200),
])
async def test_escaped_slashes_reject_refuses_encoded_slashes_in_the_path(
    sidecar_factory: SidecarFactory, upstream_factory: Upstreams, path: str, status: int
) -> None:
    port, public, internal = await public_and_internal(
        sidecar_factory, upstream_factory, "server: {escaped_slashes: reject}\n")
    answer = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    if status == 400:
        assert_refused(answer, 400, "bad_request", "escaped_slashes")
        assert public.hits == []
    else:
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert [hit.target for hit in public.hits] == [path]
    assert internal.hits == []


# Header names with underscores (issue 15, item 5d).

UNDERSCORED = (b"GET /x HTTP/1.1\r\nHost: x\r\nX-Normal: 1\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\n"
               b"Connection: close\r\n\r\n")


async def test_underscore_headers_pass_through_by_default(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    assert (await raw_exchange(proxy.port, UNDERSCORED)).startswith(b"HTTP/1.1 200 ")
    [hit] = upstream.hits
    assert (hit.headers["Transfer_Encoding"], hit.headers["Content_Length"], hit.headers["X-Normal"]) == (
        "chunked", "5", "1")


async def test_underscore_headers_drop_removes_them_on_the_way_upstream(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory("server: {underscore_headers: drop}\n" + route_yaml(upstream.url))
    assert (await raw_exchange(proxy.port, UNDERSCORED)).startswith(b"HTTP/1.1 200 ")
    [hit] = upstream.hits
    assert [name for name in hit.headers if "_" in name] == []
    assert hit.headers["X-Normal"] == "1"


async def test_underscore_headers_reject_answers_400_naming_the_header(
    sidecar_factory: SidecarFactory, upstream: Upstream
) -> None:
    proxy = await sidecar_factory("server: {underscore_headers: reject}\n" + route_yaml(upstream.url))
    assert_refused(await raw_exchange(proxy.port, UNDERSCORED), 400, "bad_request", "Transfer_Encoding")
    assert upstream.hits == []


async def test_underscore_headers_mode_follows_a_reload(sidecar_factory: SidecarFactory, upstream: Upstream) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    assert (await raw_exchange(proxy.port, UNDERSCORED)).startswith(b"HTTP/1.1 200 ")
    for mode in ("drop", "reject"):
        await proxy.sidecar.reload(parse_config(with_test_listeners(
            f"server: {{underscore_headers: {mode}}}\n" + route_yaml(upstream.url)), {}))
        answer = await raw_exchange(proxy.port, UNDERSCORED)
        assert answer.startswith(b"HTTP/1.1 200 " if mode == "drop" else b"HTTP/1.1 400 "), mode
    assert [sorted(name for name in hit.headers if "_" in name) for hit in upstream.hits] == [
        ["Content_Length", "Transfer_Encoding"], []]
