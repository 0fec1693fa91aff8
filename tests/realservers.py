"""Real servers and real clients for tests: gunicorn and Node's `http` as upstreams; requests,
httpx, aiohttp and curl as callers.

Servers are real processes on 127.0.0.1 with ports from the OS. Readiness is a handshake,
never a sleep: Node prints its port once listening; gunicorn gets a socket we bound and listen
on (`--bind fd://N`), and is ready when it answers a request on it. Every process is stopped
by the fixture that started it (tests/conftest.py).

Callers report what their user sees, in one shape (`Answer`), with header values as the raw
bytes on the wire so that a changed byte (obs-text such as latin-1 \\xe9) cannot hide behind a
client's decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import aiohttp
import httpx
import requests

ROOT = Path(__file__).resolve().parent.parent
SERVERS = Path(__file__).resolve().parent / "servers"
STARTUP_LIMIT = 15.0  # seconds: a server not ready by then failed to start


@dataclass
class RealServer:
    """A server process listening on 127.0.0.1:port."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path  # its stdout/stderr, for the failure message

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then after 5 s SIGKILL to its whole process group (its own: gunicorn's workers too)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _answers(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    """Handshake: one request on the listening socket gets a response head (bounded in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=max(0.1, deadline - time.monotonic())) as sock:
        sock.sendall(b"GET /status/204 HTTP/1.1\r\nHost: ready\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError("the server did not answer its readiness request")
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"the server closed the readiness request: {head!r}")
            head += chunk
    if not head.startswith(b"HTTP/1.1 204"):
        raise AssertionError(f"unexpected readiness answer {head!r}")


class RealServers:
    """Starts servers and stops every one of them (`stop_all`), whatever happened in between."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[RealServer] = []

    def _log(self, name: str) -> Path:
        return self.directory / f"{name}-{len(self.started)}.log"

    def gunicorn(self, *options: str) -> RealServer:
        """gunicorn serving tests/servers/wsgi_app.py with its default settings plus `options`.

        Defaults: one sync worker, which answers every request with `Connection: close` (sync
        workers do not keep connections alive). `--threads N` gives the gthread worker, which
        keeps idle connections for `keepalive` (2 s by default).
        """
        log = self._log("gunicorn")
        listener = socket.socket()
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            port = listener.getsockname()[1]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    # --no-control-socket: gunicorn >= 24 would otherwise create ~/.gunicorn/gunicorn.ctl.
                    [sys.executable, "-m", "gunicorn", "--bind", f"fd://{listener.fileno()}", "--no-control-socket",
                     *options, "tests.servers.wsgi_app:app"],
                    cwd=ROOT, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
        finally:
            listener.close()  # gunicorn holds its own copy of the listening socket
        server = RealServer("gunicorn", process, port, log)
        self.started.append(server)
        try:
            _answers(port, process, time.monotonic() + STARTUP_LIMIT)
        except (AssertionError, OSError) as exc:
            server.stop()
            raise AssertionError(f"gunicorn did not start: {exc}\n{server.log_text()}") from exc
        return server

    def node(self) -> RealServer:
        """Node's `http` server running tests/servers/node_upstream.js with default settings."""
        node = shutil.which("node")
        if node is None:
            raise AssertionError("node is not installed (.ci/run installs it)")
        log = self._log("node")
        with log.open("wb") as err:
            process = subprocess.Popen(
                [node, str(SERVERS / "node_upstream.js")], cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )
        server = RealServer("node", process, 0, log)
        self.started.append(server)
        assert process.stdout is not None
        line = _first_line(process.stdout, time.monotonic() + STARTUP_LIMIT)
        if not line.strip().isdigit():
            server.stop()
            raise AssertionError(f"node did not start: {line!r}\n{server.log_text()}")
        server.port = int(line)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


def _first_line(stream: IO[bytes], deadline: float) -> bytes:
    """The first line a process prints, or b"" if it prints none before the deadline or exits."""
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return line
            chunk = stream.read1(256)  # type: ignore[attr-defined]
            if not chunk:
                return line
            line += chunk
    return line


# ---------------------------------------------------------------------------------------------
# Callers


@dataclass
class Answer:
    """What a caller got: status, reason, headers in order as (lower-case name, raw value bytes), body."""

    status: int
    reason: str
    headers: list[tuple[str, bytes]]
    body: bytes
    # A failure after the response head came (curl only: e.g. the server closed while curl
    # was still sending a body it no longer wanted).
    transport_error: str | None = None

    def values(self, name: str) -> list[bytes]:
        return [value for key, value in self.headers if key == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[0].decode("latin-1") if values else None


class Caller(Protocol):
    name: str

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
        chunked: bool = False,
    ) -> Answer: ...

    async def close(self) -> None: ...


REQUEST_TIMEOUT = 20.0  # seconds; bounds a hang, never a speed expectation
_curl_runs = itertools.count()  # names the files of each curl run, unique across callers


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """A body as an async stream of a few pieces: clients send such a body chunked."""
    step = max(1, len(body) // 3)
    for start in range(0, len(body), step):
        yield body[start:start + step]


def _sync_pieces(body: bytes) -> Iterator[bytes]:
    step = max(1, len(body) // 3)
    for start in range(0, len(body), step):
        yield body[start:start + step]


class RequestsCaller:
    """requests (urllib3 and http.client underneath), run in a thread: it blocks."""

    name = "requests"

    def __init__(self) -> None:
        self._session = requests.Session()

    def _send(self, method: str, url: str, headers: dict[str, str] | None, body: bytes | None,
              chunked: bool) -> Answer:
        data = _sync_pieces(body) if chunked and body else body
        response = self._session.request(method, url, headers=headers, data=data, timeout=REQUEST_TIMEOUT,
                                         allow_redirects=False, stream=True)
        try:
            content = response.raw.read(decode_content=False)
            # http.client decodes header bytes as latin-1: encoding back gives the bytes on the wire.
            raw_headers = [(name.lower(), value.encode("latin-1")) for name, value in response.raw.headers.items()]
            return Answer(response.status_code, response.reason, raw_headers, content)
        finally:
            response.close()

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                      chunked: bool = False) -> Answer:
        return await asyncio.to_thread(self._send, method, url, headers, body, chunked)

    async def close(self) -> None:
        self._session.close()


class HttpxCaller:
    name = "httpx"

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT)

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                      chunked: bool = False) -> Answer:
        content = _pieces(body) if chunked and body else body
        async with self._client.stream(method, url, headers=headers, content=content) as response:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
            raw = [(name.decode("latin-1").lower(), value) for name, value in response.headers.raw]
            return Answer(response.status_code, response.reason_phrase, raw, data)

    async def close(self) -> None:
        await self._client.aclose()


class AiohttpCaller:
    name = "aiohttp"

    def __init__(self, expect100: bool = False) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        self._expect100 = expect100  # send `Expect: 100-continue` and the body only after 100 Continue

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                      chunked: bool = False) -> Answer:
        data = _pieces(body) if chunked and body else body
        async with self._session.request(method, url, headers=headers, data=data, allow_redirects=False,
                                         expect100=self._expect100) as response:
            content = await response.read()
            raw = [(name.decode("latin-1").lower(), value) for name, value in response.raw_headers]
            return Answer(response.status, response.reason or "", raw, content)

    async def close(self) -> None:
        await self._session.close()


@dataclass
class CurlCaller:
    """The curl binary, one process per request. `-H Expect:` unless `expect` is set: curl sends
    `Expect: 100-continue` for large bodies, which tests of 100-continue exercise on purpose."""

    directory: Path
    expect: bool = False
    extra: tuple[str, ...] = ()
    name: str = "curl"

    def _send(self, method: str, url: str, headers: dict[str, str] | None, body: bytes | None,
              chunked: bool) -> Answer:
        run = next(_curl_runs)
        head_file = self.directory / f"curl-{run}.head"
        body_file = self.directory / f"curl-{run}.body"
        command = ["curl", "--silent", "--show-error", "--raw", "--dump-header", str(head_file),
                   "--output", str(body_file), "--max-time", str(REQUEST_TIMEOUT), *self.extra]
        command += ["--head"] if method == "HEAD" else ["--request", method]
        for name, value in (headers or {}).items():
            command += ["--header", f"{name}: {value}"]
        if not self.expect:
            command += ["--header", "Expect:"]
        if body is not None:
            upload = self.directory / f"curl-{run}.upload"
            upload.write_bytes(body)
            command += ["--data-binary", f"@{upload}"]
            if chunked:
                command += ["--header", "Transfer-Encoding: chunked"]
        completed = subprocess.run([*command, url], capture_output=True, timeout=REQUEST_TIMEOUT + 5)
        failure = None
        if completed.returncode != 0:
            failure = f"curl exited {completed.returncode}: {completed.stderr.decode(errors='replace')}"
            if not head_file.exists() or not head_file.read_bytes().startswith(b"HTTP/"):
                raise OSError(failure)
        status, reason, headers_seen = parse_head(last_head(head_file.read_bytes()))
        # curl creates no output file for an empty body.
        content = body_file.read_bytes() if method != "HEAD" and body_file.exists() else b""
        if _is_chunked(headers_seen) and failure is None:
            content = unchunk(content)
        return Answer(status, reason, headers_seen, content, failure)

    async def request(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                      chunked: bool = False) -> Answer:
        return await asyncio.to_thread(self._send, method, url, headers, body, chunked)

    async def close(self) -> None:
        return None


def _is_chunked(headers: list[tuple[str, bytes]]) -> bool:
    return any(name == "transfer-encoding" and b"chunked" in value.lower() for name, value in headers)


def last_head(dump: bytes) -> bytes:
    """curl's --dump-header holds every head it read (interim 1xx ones too): the final one."""
    heads = [head for head in dump.split(b"\r\n\r\n") if head.startswith(b"HTTP/")]
    finals = [head for head in heads if head[9:10] != b"1"]
    return finals[-1] if finals else heads[-1]


def parse_head(head: bytes) -> tuple[int, str, list[tuple[str, bytes]]]:
    """A response head's status, reason and (lower-case name, raw value) fields."""
    status_line, *lines = head.split(b"\r\n")
    _, status, *reason = status_line.split(b" ", 2)
    fields = []
    for line in lines:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.decode("latin-1").lower(), value.strip(b" \t")))
    return int(status), (reason[0] if reason else b"").decode("latin-1"), fields


def unchunk(raw: bytes) -> bytes:
    """The data of a chunked body (its trailers ignored)."""
    if not raw:
        return raw  # no body at all (a 204, a 304)
    data, _ = split_chunked(raw)
    return data


def split_chunked(raw: bytes) -> tuple[bytes, bytes]:
    """A chunked body's data and its trailer section (the raw lines after the last chunk)."""
    data: list[bytes] = []
    position = 0
    while True:
        line_end = raw.index(b"\r\n", position)
        size = int(raw[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            return b"".join(data), raw[position:]
        data.append(raw[position:position + size])
        position += size + 2


async def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """Send raw bytes (with `Connection: close`) and split what comes back into head and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            answer = await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body
