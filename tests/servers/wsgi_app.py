"""An httpbin-like WSGI app that gunicorn serves in tests (tests/realservers.py starts it).

Endpoints:
- `/status/<n>`: answers status n with no Content-Type header (418 has httpbin's teapot body,
  other codes an empty body), like httpbin's /status/418.
- `/anything...`: echoes method, raw target, request headers and body (base64) as JSON.
- `/bytes/<n>`: n bytes of a fixed pattern (the same bytes for the same n, so answers compare).
- `/early-401`: answers 401 without reading the request body.
- `/latin`: a header whose value has an obs-text byte (`X-Latin: caf\\xe9` on the wire);
  `?chunked` frames the body chunked instead of with Content-Length; `?late` sends the head
  (with Content-Length) first and the body 50 ms later.
- `/upload`: reads the body, answers its length and sha256 as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

TEAPOT = (  # httpbin's /status/418 body
    b"\n    -=[ teapot ]=-\n\n       _...._\n     .'  _ _ `.\n    | .\"` ^ `\". _,\n"
    b"    \\_;`\"---\"`|//\n      |       ;/\n      \\_     _/\n        `\"\"\"`\n"
)
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 401: "Unauthorized",
           404: "Not Found", 418: "I'M A TEAPOT", 500: "Internal Server Error", 503: "Service Unavailable"}


def pattern(size: int) -> bytes:
    """`size` bytes of a repeating, non-trivial pattern (every byte value occurs)."""
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


def request_headers(environ: Environ) -> list[list[str]]:
    """The request's headers as [lower-case name, value] pairs (WSGI keeps no original case or order)."""
    headers = [[key[5:].replace("_", "-").lower(), value] for key, value in environ.items() if key.startswith("HTTP_")]
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        if environ.get(key):
            headers.append([name, environ[key]])
    return sorted(headers)


def read_body(environ: Environ) -> bytes:
    stream = environ["wsgi.input"]
    chunks = []
    while chunk := stream.read(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def late(body: bytes) -> Iterator[bytes]:
    """The head now (gunicorn writes it with the first item, even an empty one), the body later."""
    yield b""
    time.sleep(0.05)
    yield body


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ["PATH_INFO"]
    method: str = environ["REQUEST_METHOD"]
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        body = TEAPOT if status == 418 else b""
        headers = [("Content-Length", str(len(body)))] if status not in (204, 304) else []
        if status == 418:
            headers.append(("x-more-info", "http://tools.ietf.org/html/rfc2324"))
        start_response(f"{status} {REASONS.get(status, 'Whatever')}", headers)
        return [body]
    if path.startswith("/anything"):
        body = read_body(environ)
        echoed = {"method": method, "target": environ["RAW_URI"], "headers": request_headers(environ),
                  "body": base64.b64encode(body).decode()}
        payload = json.dumps(echoed).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]
    if path.startswith("/bytes/"):
        body = pattern(int(path.rsplit("/", 1)[1]))
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/early-401":
        body = b'{"error": "unauthorized"}'
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                            ("WWW-Authenticate", 'Bearer realm="test"')])
        return [body]
    if path == "/latin":
        # WSGI header values are latin-1 "native strings": \xe9 leaves gunicorn as the byte E9.
        body = b"latin"
        headers = [("Content-Type", "text/plain"), ("X-Latin", "caf\xe9")]
        query = environ.get("QUERY_STRING", "")
        if "chunked" not in query:
            headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        if "late" in query:
            return late(body)
        return [body[:2], body[2:]] if "chunked" in query else [body]  # without a length gunicorn frames it chunked
    if path == "/upload":
        body = read_body(environ)
        payload = json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]
