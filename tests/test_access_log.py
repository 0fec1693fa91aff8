"""Access log: one JSON line per request with the fields an operator needs; off, sampled, query opt-in."""

from __future__ import annotations

import aiohttp

from tests.conftest import SidecarFactory, Upstream, answering, route_yaml

sick = answering(503)


async def test_each_request_logs_one_line_with_every_field(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    upstream.on("/sick", sick)
    proxy = await sidecar_factory(route_yaml(upstream.url, "retries: {attempts: 2, backoff: {base: 1ms, max: 1ms}}"))
    async with client.get(proxy.url + "/ok?token=secret", headers={"X-Request-Id": "req-1"}) as response:
        assert response.status == 200
    async with client.get(proxy.url + "/sick") as response:
        assert response.status == 503
    async with client.get(proxy.url.replace("127.0.0.1", "localhost") + "/ok"):
        pass
    ok, failed, _ = proxy.access_log()
    assert set(ok) == {"time", "request_id", "route", "method", "path", "status", "duration_ms", "upstream_ms",
                       "attempts", "endpoint", "breaker", "error"}
    assert (ok["request_id"], ok["route"], ok["method"], ok["path"], ok["status"]) == ("req-1", "main", "GET",
                                                                                       "/ok", 200)
    assert (ok["attempts"], ok["endpoint"], ok["breaker"], ok["error"]) == (1, upstream.url, "closed", None)
    assert ok["duration_ms"] >= ok["upstream_ms"] > 0
    assert (failed["status"], failed["attempts"], failed["error"]) == (503, 2, None)  # the upstream's own 503


async def test_sidecar_errors_and_unmatched_requests_name_their_kind(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await sidecar_factory(f"""
        upstreams:
          down: {{endpoints: ["http://127.0.0.1:{unused_tcp_port}"]}}
        routes:
          - {{name: down, match: {{path_prefix: /down}}, upstream: down, retries: {{attempts: 1}}}}
    """)
    async with client.get(proxy.url + "/down"):
        pass
    async with client.get(proxy.url + "/nowhere"):
        pass
    down, nowhere = proxy.access_log()
    assert (down["status"], down["error"], down["attempts"]) == (502, "connect_failure", 1)
    assert (nowhere["route"], nowhere["status"], nowhere["error"]) == (None, 404, "no_route")


async def test_query_is_logged_only_when_asked(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await sidecar_factory("log: {query: true}\n" + route_yaml(upstream.url))
    async with client.get(proxy.url + "/ok?x=1"):
        pass
    assert proxy.access_log()[0]["path"] == "/ok?x=1"


async def test_access_log_can_be_off_or_sampled(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    off = await sidecar_factory("log: {access: false}\n" + route_yaml(upstream.url))
    none = await sidecar_factory("log: {sample: 0}\n" + route_yaml(upstream.url))
    half = await sidecar_factory("log: {sample: 0.5}\n" + route_yaml(upstream.url))
    for proxy in (off, none, half):
        for _ in range(200):
            async with client.get(proxy.url + "/ok"):
                pass
    assert off.access_log() == [] and none.access_log() == []
    assert 50 < len(half.access_log()) < 150
