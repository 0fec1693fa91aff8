"""Hot-path metrics are tallied in plain Python and folded into prometheus-client when collected:
what a scrape shows must be exactly what prometheus-client's own calls would have shown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Histogram

from sidecar.telemetry.metrics import DURATION_BUCKETS, Metrics
from tests.conftest import Gate, SidecarFactory, Upstream, route_yaml, with_test_listeners

# Bucket bounds themselves (an observation equal to a bound belongs to that bucket),
# values between them, zero, and values past the last bound (+Inf only).
OBSERVED = [0.0, 0.001, 0.0010001, 0.0025, 0.003, 0.05, 0.7, 1.0, 60.0, 61.0, 3600.0, 0.0009999]


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect() if family.name == name
        for sample in family.samples if not sample.name.endswith("_created")
    }


def test_tallied_durations_land_in_the_buckets_prometheus_client_would_pick() -> None:
    tallied = Metrics(CollectorRegistry())
    route = tallied.route("main")
    reference_registry = CollectorRegistry()
    reference = Histogram("sidecar_request_duration_seconds", "", ["route"], buckets=DURATION_BUCKETS,
                          registry=reference_registry).labels("main")
    for seconds in OBSERVED:
        route.answered("GET", 200, seconds)
        reference.observe(seconds)
    expected = samples(reference_registry, "sidecar_request_duration_seconds")
    assert samples(tallied.registry, "sidecar_request_duration_seconds") == expected
    # A second collection adds nothing: the tallies were moved, not copied.
    assert samples(tallied.registry, "sidecar_request_duration_seconds") == expected
    assert tallied.registry.get_sample_value(
        "sidecar_requests_total", {"route": "main", "method": "GET", "code": "200"}) == len(OBSERVED)


def test_made_up_methods_share_one_label() -> None:
    metrics = Metrics(CollectorRegistry())
    route = metrics.route("main")
    for method in ("BREW", "WHEN", "GET"):
        route.answered(method, 200, 0.01)
    value = metrics.registry.get_sample_value
    assert value("sidecar_requests_total", {"route": "main", "method": "OTHER", "code": "200"}) == 2
    assert value("sidecar_requests_total", {"route": "main", "method": "GET", "code": "200"}) == 1


async def test_a_request_that_straddles_a_reload_of_its_route_is_counted_once_and_leaves_no_one_in_flight(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gate = Gate()
    upstream.on("/held", gate)
    path = tmp_path / "sidecar.yaml"
    proxy = await sidecar_factory(route_yaml(upstream.url), config_file=path)

    async def call() -> int:
        async with client.get(proxy.url + "/held") as response:
            await response.read()
            return response.status

    pending = asyncio.create_task(call())
    await gate.until_waiting(1)
    path.write_text(with_test_listeners(route_yaml(upstream.url, "timeouts: {total: 9s}")))  # the route changes
    async with client.post(proxy.admin + "/api/v1/reload") as response:
        assert response.status == 200
    assert proxy.metric("sidecar_in_flight_requests", route="main") == 1
    gate.release.set()
    assert await pending == 200
    assert proxy.metric("sidecar_in_flight_requests", route="main") == 0
    assert proxy.metric("sidecar_requests_total", route="main", method="GET", code="200") == 1
    assert proxy.metric("sidecar_upstream_attempts_total", route="main", outcome="success") == 1
