"""Outlier ejection on a virtual-time loop: how long an endpoint stays out, and when it is back."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sidecar.config import parse_config
from sidecar.proxy.endpoints import MAX_EJECTION_SECONDS, EndpointPool
from sidecar.telemetry.events import EventBus
from sidecar.telemetry.metrics import Metrics
from tests.helpers import VirtualClockLoop, run_virtual

CONFIG = """
upstreams:
  pair:
    endpoints: [http://127.0.0.1:1, http://127.0.0.1:2]
    outlier: {consecutive_failures: 1, base_ejection: 200ms}
routes: [{name: main, match: {path_prefix: /}, upstream: pair}]
"""


def pool(loop: VirtualClockLoop, registry: CollectorRegistry) -> EndpointPool:
    metrics = Metrics(registry)
    return EndpointPool(parse_config(CONFIG, {}).upstreams[0], metrics, loop.time, EventBus(metrics))


def test_each_ejection_lasts_base_ejection_times_its_count() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        registry = CollectorRegistry()
        endpoints = pool(loop, registry)
        bad = endpoints.spec.endpoints[0]

        def ejected_gauge() -> float | None:
            return registry.get_sample_value(
                "sidecar_upstream_endpoint_ejected", {"upstream": "pair", "endpoint": bad.base})

        endpoints.record(bad, failed=True)
        assert endpoints.is_ejected(bad) and ejected_gauge() == 1
        await loop.advance(0.19)
        assert endpoints.is_ejected(bad)
        await loop.advance(0.011)  # past 200 ms: back, and the gauge says so without a request
        assert not endpoints.is_ejected(bad) and ejected_gauge() == 0
        endpoints.record(bad, failed=True)  # the second ejection: 400 ms
        await loop.advance(0.39)
        assert endpoints.is_ejected(bad) and ejected_gauge() == 1
        await loop.advance(0.011)
        assert not endpoints.is_ejected(bad) and ejected_gauge() == 0
        assert {endpoints.pick() for _ in range(2)} == set(endpoints.spec.endpoints)

    run_virtual(scenario)


def test_ejection_time_is_capped() -> None:
    async def scenario(loop: VirtualClockLoop) -> None:
        endpoints = pool(loop, CollectorRegistry())
        bad = endpoints.spec.endpoints[0]
        for _ in range(2000):  # 2000 x 200 ms would be 400 s
            endpoints.record(bad, failed=True)
            await loop.advance(MAX_EJECTION_SECONDS)
        endpoints.record(bad, failed=True)
        await loop.advance(MAX_EJECTION_SECONDS - 0.01)
        assert endpoints.is_ejected(bad)
        await loop.advance(0.011)
        assert not endpoints.is_ejected(bad)

    run_virtual(scenario)
