"""Monitoring: the alert rules and the dashboard use only catalogued metrics, promtool accepts the rules,
the config and a real scrape, and a real Prometheus sees retries and an open breaker.

promtool and prometheus come from the Debian package `prometheus` (.ci/run installs it); the tests
that need them skip, saying so, only when the binaries are absent.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gate, Hit, RawBehaviour, RunningSidecar, SidecarFactory, Upstream, answering, wait_until
from tests.helpers import status_of

ROOT = Path(__file__).resolve().parent.parent
METRICS_DOC = ROOT / "docs" / "metrics.md"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)"
)


# --- The catalogue and the queries -------------------------------------------------------------

CATALOGUE_ROW = re.compile(r"^\|\s*`(?P<name>sidecar_\w+)`\s*\|\s*(?P<type>\w+)\s*\|(?P<labels>[^|]*)\|")
METRIC_NAME = re.compile(r"\bsidecar_[A-Za-z0-9_:]*")
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'" r"|`[^`]*`")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge or histogram
    labels: frozenset[str]


def catalogue() -> dict[str, Metric]:
    """The metric table of docs/metrics.md: name -> type and labels (counters are written with `_total`)."""
    rows = [line for line in METRICS_DOC.read_text().splitlines() if line.startswith("| `sidecar_")]
    metrics: dict[str, Metric] = {}
    for row in rows:
        match = CATALOGUE_ROW.match(row)
        assert match, f"unparsable catalogue row: {row}"
        labels = frozenset(label.strip() for label in match["labels"].split(",") if label.strip())
        metrics[match["name"]] = Metric(match["name"], match["type"], labels)
    assert len(metrics) == len(rows) > 0, "every catalogue row names a distinct metric"
    return metrics


def catalogue_name(identifier: str, metrics: dict[str, Metric]) -> str | None:
    """The catalogue entry a series name belongs to, or None: `_bucket`/`_sum`/`_count` (and `_created`)
    of a histogram, `_created` of a counter; a counter is only ever named with its `_total`."""
    if identifier in metrics:
        return identifier
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        base = identifier.removesuffix(suffix)
        if base != identifier and base in metrics and metrics[base].kind == "histogram":
            return base
    counter = identifier.removesuffix("_created") + "_total"
    if identifier.endswith("_created") and counter in metrics and metrics[counter].kind == "counter":
        return counter
    return None


def referenced_names(expr: str) -> set[str]:
    """Every `sidecar_*` identifier in a PromQL expression, outside string literals (label values)."""
    return set(METRIC_NAME.findall(STRING_LITERAL.sub('""', expr)))


def unknown_names(expr: str, metrics: dict[str, Metric]) -> set[str]:
    return {name for name in referenced_names(expr) if catalogue_name(name, metrics) is None}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    stack = list(dashboard()["panels"])
    while stack:
        panel = stack.pop(0)
        yield panel
        stack.extend(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def test_catalogue_names_counters_with_total_and_histograms_without_suffix() -> None:
    metrics = catalogue()
    assert "sidecar_requests_total" in metrics and "sidecar_request_duration_seconds" in metrics
    for metric in metrics.values():
        assert metric.kind in {"counter", "gauge", "histogram"}, metric.name
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        assert not metric.name.endswith(("_bucket", "_sum", "_count", "_created")), metric.name


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_references_only_catalogue_metrics(source: str) -> None:
    metrics = catalogue()
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    assert queries, f"no queries found in the {source}"
    for where, expr in queries:
        assert referenced_names(expr), f"{where} references no sidecar metric: {expr}"
    unknown = {where: sorted(unknown_names(expr, metrics)) for where, expr in queries if unknown_names(expr, metrics)}
    assert unknown == {}, f"names not in docs/metrics.md: {unknown}"


@pytest.mark.parametrize("expr", [
    "rate(sidecar_reqests_total[5m])",  # typo
    "sidecar_requests",  # a counter without its _total: no such series
    "sidecar_in_flight_requests_total",  # a gauge has no _total
    "sidecar_requests_total_bucket",  # a counter has no buckets
    "sidecar_circuit_breaker_state_count",
    'sum(sidecar_requests_total{route="main"}) / sum(sidecar_request_duration_secs_count)',
])
def test_name_check_rejects_names_not_in_the_catalogue(expr: str) -> None:
    assert unknown_names(expr, catalogue())


@pytest.mark.parametrize("expr", [
    "histogram_quantile(0.99, sum by (le) (rate(sidecar_request_duration_seconds_bucket[5m])))",
    "rate(sidecar_upstream_attempt_duration_seconds_sum[5m])"
    " / rate(sidecar_upstream_attempt_duration_seconds_count[5m])",
    "sidecar_requests_created",
    'sidecar_requests_total{route="sidecar_not_a_metric"}',  # label values are not names
])
def test_name_check_accepts_catalogue_names_and_their_series_suffixes(expr: str) -> None:
    assert referenced_names(expr)
    assert unknown_names(expr, catalogue()) == set()


def test_dashboard_takes_its_datasource_and_routes_from_variables() -> None:
    board = dashboard()
    assert 38 <= board["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["route"]["query"]["query"] == "label_values(sidecar_requests_total, route)"
    panels = [panel for panel in dashboard_panels() if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard_panels()}) == len(list(dashboard_panels()))
    metrics = catalogue()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            routed = {catalogue_name(name, metrics) for name in referenced_names(target["expr"])}
            if any("route" in metrics[name].labels for name in routed if name):
                assert 'route=~"$route"' in target["expr"], f"{panel['title']}: not filtered by $route"


def test_dashboard_shows_each_health_signal() -> None:
    queries = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", [])) for panel in dashboard_panels()}
    by_type = {panel["title"]: panel["type"] for panel in dashboard_panels()}
    wanted = {
        "sidecar_requests_total", "sidecar_upstream_attempts_total", "sidecar_request_duration_seconds_bucket",
        "sidecar_retries_total", "sidecar_retries_skipped_total", "sidecar_circuit_breaker_state",
        "sidecar_circuit_breaker_rejections_total", "sidecar_limit_rejections_total",
        "sidecar_upstream_endpoint_ejected",
    }
    shown = set().union(*(referenced_names(expr) for expr in queries.values()))
    assert wanted <= shown, wanted - shown
    breaker_panels = [title for title, expr in queries.items() if "sidecar_circuit_breaker_state" in expr]
    assert [by_type[title] for title in breaker_panels] == ["state-timeline"]
    latency = next(expr for expr in queries.values() if "sidecar_request_duration_seconds_bucket" in expr)
    assert all(f"histogram_quantile({q}," in latency for q in ("0.5", "0.9", "0.99"))


# --- promtool ----------------------------------------------------------------------------------


def promtool(*args: str) -> tuple[int, str]:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR, check=False
    )
    return result.returncode, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    code, output = promtool("check", "rules", str(ALERTS))
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


@needs_promtool
def test_alert_rule_unit_tests_pass() -> None:
    code, output = promtool("test", "rules", str(ALERTS_TEST))
    assert code == 0, output


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no case where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no case where it stays quiet"


@needs_promtool
def test_prometheus_config_and_its_rule_files_pass_promtool_check() -> None:
    code, output = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert code == 0, output
    assert "SUCCESS: 1 rule files found" in output


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query as a recording rule (Grafana's variables filled in)."""
    grafana_variables = {"$__rate_interval": "1m", "$route": ".*", "$instance": ".*"}
    rules = []
    for index, (where, expr) in enumerate(dashboard_queries()):
        if where.startswith("variable"):
            continue  # label_values(...) is Grafana's, not PromQL
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    code, output = promtool("check", "rules", str(path))
    assert code == 0, output


# --- A sidecar in every state ------------------------------------------------------------------


ok = answering(200, "ok")
not_found = answering(404)


async def unavailable(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    hit.body = await request.content.read()
    return web.Response(status=503, text="sick")


broken = answering(500)


def every_state_yaml(web_url: str, bad_url: str, good_url: str, rude_url: str) -> str:
    return f"""
        upstreams:
          web: {{endpoints: ["{web_url}"]}}
          rude: {{endpoints: ["{rude_url}"]}}
          pair:
            endpoints: ["{bad_url}", "{good_url}"]
            outlier: {{consecutive_failures: 1, base_ejection: 60s}}
        routes:
          - name: main          # codes, retries, attempts_exhausted and non_idempotent skips
            match: {{path_prefix: /main/}}
            strip_prefix: true
            upstream: web
            retries: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
            circuit_breaker: {{enabled: false}}
          - name: stingy        # a budget with no room: the retry is skipped for the budget
            match: {{path_prefix: /stingy/}}
            strip_prefix: true
            upstream: web
            retries: {{attempts: 3, backoff: {{base: 1ms, max: 1ms}}, budget: {{ratio: 0, min_per_second: 0}}}}
            circuit_breaker: {{enabled: false}}
          - name: fragile       # one failure opens the breaker; the next request is rejected
            match: {{path_prefix: /fragile/}}
            strip_prefix: true
            upstream: web
            retries: {{attempts: 1}}
            circuit_breaker: {{failure_threshold: 1, reset_timeout: 60s}}
          - name: narrow        # one slot, no queue
            match: {{path_prefix: /narrow/}}
            strip_prefix: true
            upstream: web
            limits: {{max_concurrent: 1}}
          - name: operated      # an operator forces its breaker open through the admin API
            match: {{path_prefix: /operated/}}
            strip_prefix: true
            upstream: web
          - name: rude          # a connection closed under a reused request, and bytes nobody asked for
            match: {{path_prefix: /rude/}}
            strip_prefix: true
            upstream: rude
          - name: spread        # the failing endpoint of two is ejected
            match: {{path_prefix: /spread/}}
            strip_prefix: true
            upstream: pair
            retries: {{attempts: 1}}
            circuit_breaker: {{enabled: false}}
          - name: queued        # durable delivery: delivered, retried, dead, deduplicated, one left waiting
            match: {{path_prefix: /queued/}}
            strip_prefix: true
            upstream: web
            circuit_breaker: {{enabled: false}}
            delivery: {{backoff: {{base: 1ms, max: 1m}}, concurrency: 4}}
          - name: cached        # a miss, a hit, and an eviction: room for one small entry only
            match: {{path_prefix: /cached/}}
            strip_prefix: true
            upstream: web
            cache: {{max_bytes: 3KiB, default_ttl: 1m}}
    """


EVENT_BURST = 1000  # well above a subscriber's queue (sidecar.events.QUEUE_SIZE, 256)


async def drive_into_every_state(
    client: aiohttp.ClientSession, proxy: RunningSidecar, web_upstream: Upstream, gate: Gate, config_file: Path,
    rude_url: str,
) -> None:
    url = proxy.url
    assert await status_of(client, url + "/main/ok") == (200, None)
    assert await status_of(client, url + "/main/missing") == (404, None)
    assert await status_of(client, url + "/main/flaky") == (200, None)  # 503, retried, 200
    assert await status_of(client, url + "/main/sick") == (503, None)  # attempts_exhausted
    assert await status_of(client, url + "/main/sick", "POST", data=b"x") == (503, None)  # non_idempotent
    assert await status_of(client, url + "/stingy/sick") == (503, None)  # budget
    assert await status_of(client, url + "/fragile/sick") == (503, None)  # opens the breaker
    assert await status_of(client, url + "/fragile/sick") == (503, "circuit_open")
    assert await status_of(client, url + "/nowhere") == (404, "no_route")
    held = asyncio.create_task(status_of(client, url + "/narrow/held"))
    await wait_until(lambda: gate.waiting == 1)
    assert await status_of(client, url + "/narrow/held") == (503, "overloaded")
    gate.release.set()
    assert await held == (200, None)
    spread = [await status_of(client, url + "/spread/x") for _ in range(4)]
    assert sorted(spread) == [(200, None)] * 3 + [(500, None)]  # out after its first failure
    assert len(web_upstream.hits_for("/sick")) == 5  # main GET twice, main POST, stingy, fragile once
    async with client.post(proxy.admin + "/api/v1/breakers/operated/open") as response:
        assert response.status == 200 and (await response.json())["forced"] is True
    assert await status_of(client, url + "/rude/once") == (200, None)
    assert await status_of(client, url + "/rude/again") == (200, None)  # stale pooled connection, retried
    assert await status_of(client, url + "/rude/late") == (200, None)  # then bytes nobody asked for
    await wait_until(lambda: proxy.metric("sidecar_upstream_unsolicited_closes_total", endpoint=rude_url) == 1)
    assert await status_of(client, url + "/operated/ok") == (503, "circuit_open")
    assert await status_of(client, url + "/cached/ok") == (200, None)  # miss, stored
    assert await status_of(client, url + "/cached/ok") == (200, None)  # hit
    assert await status_of(client, url + "/cached/missing") == (404, None)  # miss, stored: /ok evicted
    await overflow_an_event_stream(client, proxy)
    await refuse_a_reload(client, proxy, config_file)
    await queue_and_deliver(client, proxy)


async def wait_retry_later(request: web.BaseRequest, hit: Hit) -> web.StreamResponse:
    return web.Response(status=503, headers={"Retry-After": "60"})


async def queue_and_deliver(client: aiohttp.ClientSession, proxy: RunningSidecar) -> None:
    """Writes to the queued route: one delivered, one retried then delivered, one dead (404), one sent
    twice with the same Idempotency-Key, one told to come back in a minute (still queued at the scrape)."""
    for path, headers in [("/queued/ok", {}), ("/queued/flaky-queued", {}), ("/queued/missing", {}),
                          ("/queued/stuck", {}), ("/queued/ok", {"Idempotency-Key": "k"}),
                          ("/queued/ok", {"Idempotency-Key": "k"})]:
        async with client.post(proxy.url + path, data=b"message", headers=headers) as response:
            assert response.status == 202
    def count(outcome: str) -> float:
        return proxy.metric("sidecar_deliveries_total", route="queued", outcome=outcome)

    await wait_until(lambda: count("delivered") == 3 and count("dead") == 1 and count("retried") >= 2)
    # The gauges are read from the store every second.
    await wait_until(lambda: proxy.metric("sidecar_queue_messages", route="queued", status="dead") == 1
                     and proxy.metric("sidecar_queue_messages", route="queued", status="delivered") == 3)


async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw upstream that closes a kept-alive connection under the next request after `/once`,
    and sends a second, unasked answer after `/late`."""
    for _ in range(10):
        path = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if path == b"/once":
            await reader.readuntil(b"\r\n\r\n")
            return  # closed without an answer: the idle-timeout race
        if path == b"/late":
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await writer.drain()


async def refuse_a_reload(client: aiohttp.ClientSession, proxy: RunningSidecar, config_file: Path) -> None:
    """An invalid config file is refused whole (and counted); the running config keeps serving."""
    config_file.write_text(config_file.read_text().replace("upstream: web", "upstream: nowhere", 1))
    async with client.post(proxy.admin + "/api/v1/reload") as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_config"


async def overflow_an_event_stream(client: aiohttp.ClientSession, proxy: RunningSidecar) -> None:
    """A subscriber that cannot keep up loses events. Traffic cannot publish events fast enough to show
    it in test time, so this publishes a burst on the sidecar's bus directly (as tests/test_admin_api.py
    does): the stream's handler gets no turn in between, so its queue overflows."""
    async with client.get(proxy.admin + "/api/v1/events") as response:
        async with asyncio.timeout(5):
            assert await response.content.readuntil(b"\n\n") == b": subscribed\n\n"
        for number in range(EVENT_BURST):
            proxy.sidecar.events.publish("test", None, number=number)
        response.close()
    assert proxy.metric("sidecar_admin_events_dropped_total") > 0


@pytest.fixture
async def scrape(
    sidecar_factory: SidecarFactory, upstream_factory: Callable[[str], Awaitable[Upstream]],
    client: aiohttp.ClientSession, tmp_path: Path, raw_upstream: Callable[[RawBehaviour], Awaitable[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """The admin /metrics text (Prometheus text format) after traffic through every state."""
    monkeypatch.setenv("SIDECAR_STATE_DIR", str(tmp_path / "state"))  # the queued route's store
    web_upstream = await upstream_factory("web")
    bad = await upstream_factory("bad")
    good = await upstream_factory("good")
    gate = Gate()
    web_upstream.on("/ok", ok)
    web_upstream.on("/missing", not_found)
    web_upstream.on("/flaky", unavailable, ok)
    web_upstream.on("/sick", unavailable)
    web_upstream.on("/held", gate)
    web_upstream.on("/flaky-queued", unavailable, ok)
    web_upstream.on("/stuck", wait_retry_later)
    bad.on("/x", broken)
    config_file = tmp_path / "sidecar.yaml"
    rude_url = f"http://127.0.0.1:{await raw_upstream(rude)}"
    proxy = await sidecar_factory(every_state_yaml(web_upstream.url, bad.url, good.url, rude_url),
                                  config_file=config_file)
    await drive_into_every_state(client, proxy, web_upstream, gate, config_file, rude_url)
    async with client.get(proxy.admin + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


@needs_promtool
async def test_scrape_of_a_sidecar_in_every_state_passes_promtool_check_metrics(scrape: str) -> None:
    assert PROMTOOL is not None
    process = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        output, _ = await process.communicate(scrape.encode())
    assert process.returncode == 0, f"promtool check metrics:\n{output.decode()}"


# Traffic and the admin API reach every catalogue metric (none is left out) and these label values.
# The event-stream overflow is the one state driven from inside (see overflow_an_event_stream).
ZERO_IS_RIGHT = {"sidecar_in_flight_requests", "sidecar_websocket_connections"}
EXPECTED_SAMPLES: list[tuple[str, dict[str, str]]] = [
    ("sidecar_requests_total", {"route": "main", "method": "GET", "code": "200"}),
    ("sidecar_requests_total", {"route": "main", "method": "GET", "code": "404"}),
    ("sidecar_requests_total", {"route": "main", "method": "POST", "code": "503"}),
    ("sidecar_requests_total", {"route": "spread", "method": "GET", "code": "500"}),
    ("sidecar_requests_total", {"route": "_no_route", "method": "GET", "code": "404"}),
    ("sidecar_upstream_attempts_total", {"route": "main", "outcome": "success"}),
    ("sidecar_upstream_attempts_total", {"route": "main", "outcome": "failure_status"}),
    ("sidecar_retries_total", {"route": "main", "reason": "503"}),
    ("sidecar_retries_skipped_total", {"route": "main", "reason": "attempts_exhausted"}),
    ("sidecar_retries_skipped_total", {"route": "main", "reason": "non_idempotent"}),
    ("sidecar_retries_skipped_total", {"route": "stingy", "reason": "budget"}),
    ("sidecar_circuit_breaker_state", {"route": "fragile", "state": "open"}),
    ("sidecar_circuit_breaker_transitions_total", {"route": "fragile", "to": "open"}),
    ("sidecar_circuit_breaker_rejections_total", {"route": "fragile"}),
    ("sidecar_limit_rejections_total", {"route": "narrow", "limit": "concurrent"}),
    ("sidecar_upstream_endpoint_ejected", {"upstream": "pair"}),
    ("sidecar_upstream_endpoint_ejections_total", {"upstream": "pair"}),
    ("sidecar_config_reloads_total", {"result": "success"}),
    ("sidecar_config_reloads_total", {"result": "failure"}),
    ("sidecar_circuit_breaker_forced", {"route": "operated"}),
    ("sidecar_circuit_breaker_rejections_total", {"route": "operated"}),
    ("sidecar_admin_events_dropped_total", {}),
    ("sidecar_config_last_reload_success_timestamp_seconds", {}),
    ("sidecar_build_info", {}),
    ("sidecar_upstream_stale_connections_total", {}),
    ("sidecar_upstream_unsolicited_closes_total", {}),
    ("sidecar_request_duration_seconds_count", {"route": "narrow"}),
    ("sidecar_upstream_attempt_duration_seconds_count", {"route": "spread"}),
    ("sidecar_deliveries_total", {"route": "queued", "outcome": "delivered"}),
    ("sidecar_deliveries_total", {"route": "queued", "outcome": "retried"}),
    ("sidecar_deliveries_total", {"route": "queued", "outcome": "dead"}),
    ("sidecar_deliveries_total", {"route": "queued", "outcome": "deduplicated"}),
    ("sidecar_queue_messages", {"route": "queued", "status": "queued"}),
    ("sidecar_queue_messages", {"route": "queued", "status": "dead"}),
    ("sidecar_cache_requests_total", {"route": "cached", "result": "miss"}),
    ("sidecar_cache_requests_total", {"route": "cached", "result": "hit"}),
    ("sidecar_cache_bytes", {"route": "cached"}),
    ("sidecar_cache_evictions_total", {"route": "cached"}),
]


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def test_traffic_through_every_state_produces_every_catalogue_metric(scrape: str) -> None:
    scraped = samples(scrape)
    metrics = catalogue()
    for metric in metrics.values():
        series_name = metric.name + "_bucket" if metric.kind == "histogram" else metric.name
        values = [value for name, _, value in scraped if name == series_name]
        assert values, f"{metric.name} is not in the scrape"
        if metric.name not in ZERO_IS_RIGHT:
            assert max(values) > 0, f"{metric.name}: traffic left every series at 0"
    for name, labels in EXPECTED_SAMPLES:
        matching = [value for sample, have, value in scraped if sample == name and labels.items() <= have.items()]
        assert matching and max(matching) >= 1, f"{name}{labels}: {matching}"


async def test_scraped_series_carry_exactly_the_catalogue_labels(scrape: str) -> None:
    metrics = catalogue()
    for name, labels, _ in samples(scrape):
        entry = catalogue_name(name, metrics)
        assert entry is not None, f"{name} is exposed but not in docs/metrics.md"
        assert set(labels) - {"le"} == metrics[entry].labels, f"{name}: labels {sorted(labels)}"


# --- A real Prometheus -------------------------------------------------------------------------


POLL_SECONDS = 0.25
# Prometheus scrapes a new target first about 5s after it starts (its scrape manager applies
# discovered targets on a 5s tick), then every scrape_interval.
READY_WITHIN = 15.0
REPORTED_WITHIN = 20.0


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession, log: Path) -> None:
        self.url, self.session, self.log = url, session, log

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with self.session.get(self.url + "/api/v1/query", params={"query": promql}) as response:
            body = await response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def poll(self, promql: str, expected: set[str], limit: float = REPORTED_WITHIN) -> None:
        """Until the query returns exactly one series per expected value (as Prometheus prints them)."""
        deadline = time.monotonic() + limit
        seen: list[dict[str, Any]] = []
        for _ in range(int(limit / POLL_SECONDS)):
            seen = await self.query(promql)
            if {series["value"][1] for series in seen} == expected and len(seen) == len(expected):
                return
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        pytest.fail(f"{promql}: expected values {expected}, last got {seen}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "prometheus log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


async def answers_200(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False  # not listening yet


@asynccontextmanager
async def running_prometheus(admin: str, port: int, directory: Path) -> AsyncIterator[Prometheus]:
    """A Prometheus on 127.0.0.1:port scraping the admin address every second, with alerts.yml loaded."""
    assert PROMETHEUS is not None
    target = admin.removeprefix("http://")
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        # 1s is fine for Prometheus (any interval > 0; scrape_timeout must not exceed it).
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "sidecar", "static_configs": [{"targets": [target]}]}],
    }))
    log = directory / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            prometheus = Prometheus(url, session, log)
            deadline = time.monotonic() + READY_WITHIN
            ready = False
            for _ in range(int(READY_WITHIN / 0.1)):
                assert process.returncode is None, f"prometheus exited {process.returncode}\n{prometheus.log_tail()}"
                ready = await answers_200(session, url + "/-/ready")
                if ready or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            if not ready:
                pytest.fail(f"prometheus not ready within {READY_WITHIN}s\n{prometheus.log_tail()}")
            yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def two_routes_yaml(upstream_url: str) -> str:
    return f"""
        upstreams:
          web: {{endpoints: ["{upstream_url}"]}}
        routes:
          - name: retrying
            match: {{path_prefix: /retrying/}}
            strip_prefix: true
            upstream: web
            retries: {{attempts: 2, backoff: {{base: 1ms, max: 1ms}}}}
            circuit_breaker: {{enabled: false}}
          - name: fragile
            match: {{path_prefix: /fragile/}}
            strip_prefix: true
            upstream: web
            retries: {{attempts: 1}}
            circuit_breaker: {{failure_threshold: 1, reset_timeout: 60s}}
    """


@needs_prometheus
async def test_real_prometheus_sees_the_retry_and_the_open_breaker(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession,
    unused_tcp_port: int, tmp_path: Path,
) -> None:
    upstream.on("/flaky", unavailable, ok)
    upstream.on("/sick", unavailable)
    proxy = await sidecar_factory(two_routes_yaml(upstream.url))
    async with running_prometheus(proxy.admin, unused_tcp_port, tmp_path) as prometheus:
        assert await status_of(client, proxy.url + "/retrying/flaky") == (200, None)
        assert await status_of(client, proxy.url + "/fragile/sick") == (503, None)
        assert await status_of(client, proxy.url + "/fragile/sick") == (503, "circuit_open")
        await prometheus.poll('sidecar_retries_total{job="sidecar", route="retrying", reason="503"}', {"1"})
        await prometheus.poll('sidecar_circuit_breaker_state{route="fragile", state="open"} == 1', {"1"})
        await prometheus.poll('sidecar_circuit_breaker_rejections_total{route="fragile"}', {"1"})


@needs_prometheus
async def test_alert_rules_match_live_series_in_a_real_prometheus(
    sidecar_factory: SidecarFactory, upstream: Upstream, client: aiohttp.ClientSession,
    unused_tcp_port: int, tmp_path: Path,
) -> None:
    """The breaker and error-ratio alerts go pending on the sidecar's real labels (they fire after `for`)."""
    upstream.on("/sick", unavailable)
    proxy = await sidecar_factory(two_routes_yaml(upstream.url))
    alerts = {"SidecarCircuitBreakerOpen", "SidecarHighErrorRatio"}
    pending = f'ALERTS{{alertstate="pending", route="fragile", alertname=~"{"|".join(sorted(alerts))}"}}'
    async with running_prometheus(proxy.admin, unused_tcp_port, tmp_path) as prometheus:
        deadline = time.monotonic() + REPORTED_WITHIN
        names: set[str] = set()
        for _ in range(int(REPORTED_WITHIN / POLL_SECONDS)):
            # Keep failing traffic flowing: a rate needs a counter that grows between two scrapes.
            assert (await status_of(client, proxy.url + "/fragile/sick"))[0] == 503
            names = {series["metric"]["alertname"] for series in await prometheus.query(pending)}
            if names == alerts or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
        if names != alerts:
            pytest.fail(f"pending alerts for route fragile: {names}\n{prometheus.log_tail()}")
