"""Real servers on 127.0.0.1 for every test: a scriptable misbehaving upstream and the sidecar.

Servers run on our own AppRunner/TCPSite (not pytest-aiohttp's TestServer) so they behave
as in production (TestServer forces handler_cancellation=True). Readiness is a bound
socket, never a sleep.
"""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from sidecar.config import Address, parse_config
from sidecar.runtime.sidecar import Sidecar
from tests.realservers import (
    AiohttpCaller,
    Caller,
    CurlCaller,
    HttpxCaller,
    RealServer,
    RealServers,
    RequestsCaller,
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked `both_loops` run once on asyncio's loop and once on uvloop's (`sidecar run
    --loop uvloop`): code that touches transports directly must work with either (uvloop's
    transports are not asyncio.Transport subclasses). The rest run on asyncio's, as before."""
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}  # one factory: the test id stays as it was
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


Behaviour = Callable[[web.BaseRequest, "Hit"], Awaitable[web.StreamResponse]]
RawBehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Hit:
    """One request as the upstream saw it."""

    method: str
    target: str  # raw path and query, exactly as received
    headers: CIMultiDictProxy[str]
    peer: tuple[str, int]
    body: bytes = b""


async def echo(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    """Default behaviour: read the body, answer 200 `upstream <name>: <method> <target>`."""
    hit.body = await request.content.read()
    return web.Response(text=f"{request.method} {hit.target}")


def answering(status: int, text: str | None = None) -> Behaviour:
    """A behaviour that answers at once with `status` (and `text`), not reading the body."""

    async def answer(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=status, text=text)

    return answer


async def drop_connection(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    """Close the connection without an answer (before response headers)."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


@dataclass
class Upstream:
    """A real HTTP server whose answer per path is a script of behaviours (the last one repeats)."""

    name: str
    hits: list[Hit] = field(default_factory=list)
    scripts: dict[str, list[Behaviour]] = field(default_factory=dict)
    url: str = ""
    port: int = 0

    def on(self, path: str, *behaviours: Behaviour) -> None:
        self.scripts[path] = list(behaviours)

    def hits_for(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.target.split("?")[0] == path]

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else ("", 0)
        hit = Hit(request.method, request.raw_path, request.headers.copy(), tuple(peer[:2]))  # type: ignore[arg-type]
        self.hits.append(hit)
        script = self.scripts.get(request.path) or [echo]
        behaviour = script.pop(0) if len(script) > 1 else script[0]
        return await behaviour(request, hit)


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[[str], Awaitable[Upstream]]]:
    runners: list[web.BaseRunner] = []

    async def make(name: str = "up") -> Upstream:
        upstream = Upstream(name)
        server = web.Server(upstream.handle, auto_decompress=False, max_line_size=65536, max_field_size=65536,
                            max_headers=512)
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        upstream.url = f"http://127.0.0.1:{upstream.port}"
        return upstream

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def upstream(upstream_factory: Callable[[str], Awaitable[Upstream]]) -> Upstream:
    return await upstream_factory("up")


class RunningSidecar:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.registry: CollectorRegistry = sidecar.registry
        host, port = sidecar.bound[sidecar.config.listen]
        self.url = f"http://{host}:{port}"
        self.port = port
        admin_host, admin_port = sidecar.admin_bound or ("", 0)
        self.admin = f"http://{admin_host}:{admin_port}"

    def listener_url(self, address: str) -> str:
        host, port = address.rsplit(":", 1)
        bound = self.sidecar.bound[Address(host, int(port))]
        return f"http://{bound[0]}:{bound[1]}"

    def access_log(self) -> list[dict[str, object]]:
        """The access log lines written so far, parsed."""
        self.sidecar.access_log.flush()
        stream = self.sidecar.access_log._stream
        assert isinstance(stream, io.StringIO)
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def client_connections(self) -> int:
        """Client connections open on the main listener, as its server counts them."""
        server = self.sidecar._listeners[self.sidecar.config.listen].runner.server
        assert server is not None
        return len(server.connections)


SidecarFactory = Callable[..., Awaitable[RunningSidecar]]


def with_test_listeners(text: str) -> str:
    """`listen` and `admin` default to ephemeral loopback ports in tests."""
    text = textwrap.dedent(text)
    if "\nlisten:" not in "\n" + text:
        text = "listen: 127.0.0.1:0\n" + text
    if "admin:" not in text:
        text = "admin: {listen: 127.0.0.1:0}\n" + text
    return text


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[SidecarFactory]:
    """Start a sidecar from YAML text; `listen` and `admin` default to ephemeral loopback ports."""
    started: list[Sidecar] = []

    async def make(text: str, env: dict[str, str] | None = None, config_file: Path | None = None,
                   wall_clock: Callable[[], float] = time.time) -> RunningSidecar:
        """With `config_file`, the text is written there and the sidecar can reload from it.
        `wall_clock` is the route caches' clock."""
        text = with_test_listeners(text)
        if config_file is not None:
            config_file.write_text(text)
        sidecar = Sidecar(parse_config(text, env or {}), CollectorRegistry(), log_stream=io.StringIO(),
                          config_path=str(config_file) if config_file else None, wall_clock=wall_clock)
        await sidecar.start()
        started.append(sidecar)
        return RunningSidecar(sidecar)

    yield make
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A caller that shows bytes as they came (no decompression, no added headers)."""
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")
    ) as session:
        yield session


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes (send Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


def route_yaml(upstream_url: str, extra: str = "") -> str:
    """A one-route config sending everything to `upstream_url`."""
    return f"""
upstreams:
  up: {{endpoints: ["{upstream_url}"]}}
routes:
  - name: main
    match: {{path_prefix: /}}
    upstream: up
{textwrap.indent(textwrap.dedent(extra), "    ")}
"""


async def wait_until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition that has no event to wait on (a metric, a counter), bounded in time."""
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.005)


class Gate:
    """An upstream behaviour that holds every request until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def __call__(self, request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        self.waiting += 1
        async with asyncio.timeout(10):
            await self.release.wait()
        return web.Response(text="done")

    async def until_waiting(self, count: int) -> None:
        await wait_until(lambda: self.waiting >= count)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawBehaviour], Awaitable[int]]]:
    """Upstreams that speak raw bytes (broken HTTP, interim responses): make(behaviour) -> port."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def make(behaviour: RawBehaviour) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await behaviour(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield make
    for task in list(tasks):
        task.cancel()
    for server in servers:
        server.close()


# Real servers (gunicorn, Node) and real clients (requests, httpx, aiohttp, curl): tests/realservers.py.


@pytest.fixture(scope="session")
def real_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServers]:
    """Start real server processes; every one is stopped at the end of the session at the latest."""
    servers = RealServers(tmp_path_factory.mktemp("real-servers"))
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def gunicorn(real_servers: RealServers) -> Iterator[RealServer]:
    """gunicorn with its defaults: one sync worker, `Connection: close` on every answer."""
    server = real_servers.gunicorn()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gunicorn_threads(real_servers: RealServers) -> Iterator[RealServer]:
    """gunicorn's gthread worker: keeps idle connections alive for its default 2 s."""
    server = real_servers.gunicorn("--threads", "4")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(real_servers: RealServers) -> Iterator[RealServer]:
    """Node's http server with its defaults (keepAliveTimeout 5 s)."""
    server = real_servers.node()
    yield server
    server.stop()


CALLERS = ("requests", "httpx", "aiohttp", "curl")


@pytest.fixture
async def callers(tmp_path: Path) -> AsyncIterator[Callable[[str], Caller]]:
    """make(name) -> a new caller of that kind (one of CALLERS); all are closed at teardown."""
    made: list[Caller] = []

    def make(name: str) -> Caller:
        caller: Caller
        if name == "requests":
            caller = RequestsCaller()
        elif name == "httpx":
            caller = HttpxCaller()
        elif name == "aiohttp":
            caller = AiohttpCaller()
        elif name == "curl":
            caller = CurlCaller(tmp_path)
        else:
            raise ValueError(f"unknown caller {name!r}")
        made.append(caller)
        return caller

    yield make
    for caller in made:
        await caller.close()


@pytest.fixture
async def upstream_on() -> AsyncIterator[Callable[[Upstream, int], Awaitable[None]]]:
    """Serve an Upstream on a port chosen beforehand (it is "down" until then)."""
    runners: list[web.BaseRunner] = []

    async def serve(upstream: Upstream, port: int) -> None:
        runner = web.ServerRunner(web.Server(upstream.handle), shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        upstream.port, upstream.url = port, f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()
