"""The admin listener: health, readiness and metrics that move by exactly what traffic did."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from sidecar import __version__
from tests.conftest import Hit, SidecarFactory, Upstream, route_yaml


async def test_health_and_readiness_answer_on_the_admin_port(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.admin + "/healthz") as response:
        assert response.status == 200 and await response.json() == {"status": "alive"}
    async with client.get(proxy.admin + "/readyz") as response:
        assert response.status == 200 and await response.json() == {"status": "ready"}
    proxy.sidecar.readiness.ready = False  # as while stopping
    async with client.get(proxy.admin + "/readyz") as response:
        assert response.status == 503
    async with client.get(proxy.url + "/healthz") as response:  # traffic port is not the admin port
        assert response.status == 200 and await response.text() == "GET /healthz"
    assert [hit.target for hit in upstream.hits] == ["/healthz"]


async def test_request_metrics_count_exactly_what_was_answered(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def teapot(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        return web.Response(status=418)

    upstream.on("/teapot", teapot)
    proxy = await sidecar_factory(f"""
        upstreams:
          up: {{endpoints: ["{upstream.url}"]}}
        routes:
          - {{name: api, match: {{path_prefix: /}}, upstream: up}}
    """)
    for _ in range(3):
        async with client.get(proxy.url + "/ok") as response:
            await response.read()
    async with client.post(proxy.url + "/teapot") as response:
        assert response.status == 418
    async with client.request("PURGE", proxy.url + "/ok") as response:
        assert response.status == 200
    async with client.get(proxy.admin + "/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert 'sidecar_requests_total{code="200",method="GET",route="api"} 3.0' in text
    assert 'sidecar_requests_total{code="418",method="POST",route="api"} 1.0' in text
    assert 'sidecar_requests_total{code="200",method="OTHER",route="api"} 1.0' in text
    assert 'sidecar_request_duration_seconds_count{route="api"} 5.0' in text
    assert 'sidecar_in_flight_requests{route="api"} 0.0' in text
    assert f'sidecar_build_info{{version="{__version__}"}} 1.0' in text
    assert "PURGE" not in text and "/ok" not in text  # labels stay bounded


async def test_in_flight_gauge_counts_requests_waiting_on_the_upstream(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def held(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
        arrived.set()
        async with asyncio.timeout(5):
            await release.wait()
        return web.Response(text="done")

    upstream.on("/held", held)
    proxy = await sidecar_factory(route_yaml(upstream.url))

    async def call() -> int:
        async with client.get(proxy.url + "/held") as response:
            await response.read()
            return response.status

    pending = asyncio.create_task(call())
    async with asyncio.timeout(5):
        await arrived.wait()
    assert proxy.metric("sidecar_in_flight_requests", route="main") == 1
    release.set()
    assert await pending == 200
    assert proxy.metric("sidecar_in_flight_requests", route="main") == 0
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="200") == 1


async def test_sidecar_errors_are_counted_under_their_status(
    sidecar_factory: SidecarFactory, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await sidecar_factory(route_yaml(f"http://127.0.0.1:{unused_tcp_port}"))
    for _ in range(2):
        async with client.delete(proxy.url + "/x") as response:
            assert response.status == 502
    assert proxy.metric("sidecar_requests_total", route="main", method="DELETE", code="502") == 2
    assert proxy.metric("sidecar_request_duration_seconds_count", route="main") == 2


async def test_metrics_speak_openmetrics_when_asked(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory(route_yaml(upstream.url))
    async with client.get(proxy.url + "/"):
        pass
    headers = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    async with client.get(proxy.admin + "/metrics", headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await response.text()
    assert text.endswith("# EOF\n")
    assert 'sidecar_requests_total{code="200",method="GET",route="main"} 1.0' in text


async def test_metrics_listener_serves_probes_and_metrics_but_not_the_admin_api(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory("metrics: {listen: 127.0.0.1:0}\n" + route_yaml(upstream.url))
    host, port = proxy.sidecar.metrics_bound or ("", 0)
    base = f"http://{host}:{port}"
    async with client.get(proxy.url + "/x"):
        pass
    for path in ("/healthz", "/readyz"):
        async with client.get(base + path) as response:
            assert response.status == 200
    async with client.get(base + "/metrics") as response:
        assert 'sidecar_requests_total{code="200",method="GET",route="main"} 1.0' in await response.text()
    for method, path in (("GET", "/api/v1/routes"), ("POST", "/api/v1/breakers/main/open"),
                         ("POST", "/api/v1/reload")):
        async with client.request(method, base + path) as response:
            assert response.status == 404
    async with client.get(proxy.admin + "/api/v1/routes") as response:
        assert response.status == 200
