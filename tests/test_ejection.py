"""Endpoint ejection: an endpoint that keeps failing leaves the rotation for a while; one always stays."""

from __future__ import annotations

import aiohttp

from tests.conftest import SidecarFactory, answering, wait_until
from tests.helpers import statuses

sick = answering(500)


def pair(bad_url: str, good_url: str, outlier: str) -> str:
    return f"""
        upstreams:
          pair:
            endpoints: ["{bad_url}", "{good_url}"]
            outlier: {outlier}
        routes:
          - name: main
            match: {{path_prefix: /}}
            upstream: pair
            retries: {{attempts: 1}}
            circuit_breaker: {{enabled: false}}
    """


async def test_failing_endpoint_is_ejected_then_returns(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    bad = await upstream_factory("bad")
    good = await upstream_factory("good")
    bad.on("/x", sick)
    proxy = await sidecar_factory(pair(bad.url, good.url, "{consecutive_failures: 3, base_ejection: 300ms}"))
    labels = {"upstream": "pair", "endpoint": bad.url}
    assert await statuses(client, proxy.url + "/x", 6) == [500, 200] * 3
    assert proxy.metric("sidecar_upstream_endpoint_ejected", **labels) == 1
    assert proxy.metric("sidecar_upstream_endpoint_ejections_total", **labels) == 1
    assert await statuses(client, proxy.url + "/x", 6) == [200] * 6  # all to the good one
    assert len(bad.hits) == 3 and len(good.hits) == 9
    await wait_until(lambda: proxy.metric("sidecar_upstream_endpoint_ejected", **labels) == 0)  # base_ejection x 1
    await statuses(client, proxy.url + "/x", 4)
    assert len(bad.hits) == 5  # back in the rotation


async def test_a_returning_endpoint_that_fails_again_is_ejected_again(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    bad = await upstream_factory("bad")
    good = await upstream_factory("good")
    bad.on("/x", sick)
    proxy = await sidecar_factory(pair(bad.url, good.url, "{consecutive_failures: 1, base_ejection: 200ms}"))
    labels = {"upstream": "pair", "endpoint": bad.url}
    await statuses(client, proxy.url + "/x", 1)  # ejected
    await wait_until(lambda: proxy.metric("sidecar_upstream_endpoint_ejected", **labels) == 0)
    await statuses(client, proxy.url + "/x", 2)  # back, fails, ejected again (for longer:
    # tests/test_policy_ejection.py times the growth on a virtual clock)
    assert proxy.metric("sidecar_upstream_endpoint_ejections_total", **labels) == 2
    assert proxy.metric("sidecar_upstream_endpoint_ejected", **labels) == 1
    assert len(bad.hits) == 2


async def test_at_least_one_endpoint_always_stays_in(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    first = await upstream_factory("first")
    second = await upstream_factory("second")
    first.on("/x", sick)
    second.on("/x", sick)
    proxy = await sidecar_factory(pair(first.url, second.url,
                                       "{consecutive_failures: 1, base_ejection: 10s, max_ejection_percent: 100}"))
    assert await statuses(client, proxy.url + "/x", 6) == [500] * 6
    ejected = [proxy.metric("sidecar_upstream_endpoint_ejected", upstream="pair", endpoint=url)
               for url in (first.url, second.url)]
    assert sorted(ejected) == [0, 1]
    assert len(first.hits) + len(second.hits) == 6


async def test_disabled_outlier_detection_never_ejects(
    sidecar_factory: SidecarFactory, upstream_factory, client: aiohttp.ClientSession
) -> None:
    bad = await upstream_factory("bad")
    good = await upstream_factory("good")
    bad.on("/x", sick)
    proxy = await sidecar_factory(pair(bad.url, good.url, "{enabled: false, consecutive_failures: 1}"))
    assert await statuses(client, proxy.url + "/x", 6) == [500, 200] * 3
