"""Broken upstreams: the right error kind (or an aborted body), and the next request elsewhere is unaffected."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import RawBehaviour, SidecarFactory, Upstream, wait_until


async def read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def invalid_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header Without Colon\r\n\r\nok")


async def invalid_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 twohundred OK\r\nContent-Length: 2\r\n\r\nok")


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    await writer.drain()
    writer.close()


async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok")


async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(10)


async def continue_then_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(10)


async def stall_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst part")
    await asyncio.sleep(10)


async def gigabytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4294967296\r\n\r\n")
    chunk = b"g" * 65536
    for _ in range(65536):  # 4 GiB promised; stops when the sidecar drops us
        writer.write(chunk)
        try:
            await writer.drain()
        except ConnectionError:
            return


ERRORS = [
    (invalid_header, 502, "bad_upstream_response"),
    (invalid_status, 502, "bad_upstream_response"),
    (huge_header, 502, "bad_upstream_response"),
    (never_reads, 504, "timeout"),
    (continue_then_nothing, 504, "timeout"),
]
# With the access log's `error` for each: the caller saw a 200 head, the line says what broke.
ABORTED = [(short_body, "upstream_reset"), (stall_mid_body, "timeout")]


def config(broken_port: int, healthy: Upstream) -> str:
    return f"""
        upstreams:
          broken: {{endpoints: ["http://127.0.0.1:{broken_port}"]}}
          healthy: {{endpoints: ["{healthy.url}"]}}
        routes:
          - name: broken
            match: {{path_prefix: /broken}}
            upstream: broken
            timeouts: {{per_try: 300ms, idle: 300ms}}
            retries: {{attempts: 1}}
          - {{name: healthy, match: {{path_prefix: /healthy}}, upstream: healthy}}
    """


@pytest.mark.parametrize(("behaviour", "status", "kind"), ERRORS, ids=[b.__name__ for b, _, _ in ERRORS])
async def test_broken_upstream_gets_its_error_kind_and_spares_other_routes(
    sidecar_factory: SidecarFactory, raw_upstream, upstream: Upstream, client: aiohttp.ClientSession,
    behaviour: RawBehaviour, status: int, kind: str,
) -> None:
    proxy = await sidecar_factory(config(await raw_upstream(behaviour), upstream))
    async with client.get(proxy.url + "/broken") as response:
        assert response.status == status
        assert response.headers["x-sidecar-error"] == kind
        assert (await response.json())["error"] == kind
    async with client.get(proxy.url + "/healthy") as response:
        assert response.status == 200


@pytest.mark.parametrize(("behaviour", "kind"), ABORTED, ids=[b.__name__ for b, _ in ABORTED])
async def test_body_that_breaks_off_aborts_the_caller_and_spares_other_routes(
    sidecar_factory: SidecarFactory, raw_upstream, upstream: Upstream, client: aiohttp.ClientSession,
    behaviour: RawBehaviour, kind: str,
) -> None:
    proxy = await sidecar_factory(config(await raw_upstream(behaviour), upstream))
    async with client.get(proxy.url + "/broken") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # never a truncated body that looks complete
    async with client.get(proxy.url + "/healthy") as response:
        assert response.status == 200
    broken, healthy = proxy.access_log()
    assert (broken["route"], broken["status"], broken["error"]) == ("broken", 200, kind)
    assert (healthy["route"], healthy["status"], healthy["error"]) == ("healthy", 200, None)


async def test_gigabytes_stream_through_and_a_caller_that_leaves_stops_them(
    sidecar_factory: SidecarFactory, raw_upstream, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(config(await raw_upstream(gigabytes), upstream))
    async with client.get(proxy.url + "/broken") as response:
        assert response.headers["Content-Length"] == "4294967296"
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if received > 64 * 1024 * 1024:
                break  # the caller has seen enough and hangs up
    await wait_until(lambda: proxy.metric("sidecar_in_flight_requests", route="broken") == 0)
    async with client.get(proxy.url + "/healthy") as response:
        assert response.status == 200
