"""The results of a bench.py run and their output: medians across rounds, ratios taken within each round, the
markdown table (ready to paste into a README), the JSON form, and the list of problems that fail the run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from idle import IdleResult
from measure import Sample

Getter = Callable[[Sample], float]
# The figures taken from each round's Sample; the table shows the median across rounds of each.
FIGURES: dict[str, Getter] = {
    "rps": lambda s: s.throughput.rps,
    "cpu_us_per_request": lambda s: s.cpu_us_per_request,
    "p50_ms": lambda s: s.latency.p50_ms,
    "p99_ms": lambda s: s.latency.p99_ms,
    "rss_peak_mib": lambda s: s.rss_peak_mib,
    "cpu_busy_pct": lambda s: s.cpu_busy_pct,
    "others_busy_pct": lambda s: s.others_busy_pct,
    "machine_others_busy_pct": lambda s: s.machine_others_busy_pct,
}
# Compared between two proxies (sidecar/naive, 2 workers/1 worker) as a ratio within each round.
PAIR_FIGURES = ("rps", "cpu_us_per_request", "p50_ms", "p99_ms", "rss_peak_mib")


@dataclass
class TargetReport:
    """Everything measured about one target over the run."""

    name: str
    label: str
    rss_idle_mib: float = math.nan  # after start-up (and a check request), before any load
    samples: list[Sample] = field(default_factory=list)  # one per round, in round order
    idle: IdleResult | None = None
    alive: bool = True
    processes_expected: int = 1
    processes_alive: int = 1
    log_problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    config: dict[str, Any]
    machine: dict[str, Any]
    targets: dict[str, TargetReport]  # direct first, then the proxies in measurement order
    notes: list[str]
    access_log_lines: int


# --- figures ---------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    """Median of the values that were measured (NaN = not measured); NaN if none was."""
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def ratio(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) or b == 0 else a / b


def figure(target: TargetReport, name: str) -> float:
    return median([FIGURES[name](s) for s in target.samples])


def per_round(a: TargetReport, b: TargetReport, name: str, op: Callable[[float, float], float] = ratio) -> float:
    """Median over rounds of op(a, b) for one figure, each round's pair measured minutes apart at most."""
    get = FIGURES[name]
    return median([op(get(x), get(y)) for x, y in zip(a.samples, b.samples, strict=True)])


def summary(target: TargetReport, direct: TargetReport) -> dict[str, float]:
    found = {name: figure(target, name) for name in FIGURES}
    found["rss_idle_mib"] = target.rss_idle_mib
    found["x_direct_rps"] = per_round(target, direct, "rps")
    found["added_p50_ms"] = per_round(target, direct, "p50_ms", lambda x, y: x - y)
    found["added_p99_ms"] = per_round(target, direct, "p99_ms", lambda x, y: x - y)
    return found


def pair(a: TargetReport, b: TargetReport) -> dict[str, float]:
    return {name: per_round(a, b, name) for name in PAIR_FIGURES}


def pairs(report: Report) -> dict[str, dict[str, float]]:
    """The within-run comparisons: sidecar vs naive proxy, and (with --scaling) 2 workers vs 1."""
    t = report.targets
    found = {}
    if "naive" in t:
        found["sidecar_vs_naive"] = pair(t["sidecar"], t["naive"])
    if "sidecar-2w" in t:
        found["scaling_2w_vs_1w"] = pair(t["sidecar-2w"], t["sidecar"])
    return found


# --- markdown --------------------------------------------------------------------------------------------


def num(value: float, digits: int = 2, sign: bool = False) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:+,.0f}" if sign else f"{value:,.0f}"  # big rates: no fake precision
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def header(report: Report) -> str:
    m, c = report.machine, report.config
    rounds = f"{c['rounds']} round{'s' if c['rounds'] > 1 else ''} of {c['duration_s']} s per measurement, medians"
    return (f"**{c['date']}**; {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}; "
            f"aiohttp {m['aiohttp']}; sidecar {c['code']}; {rounds}; body {c['body_size']:,} bytes")


def table_rows(report: Report) -> list[str]:
    direct = report.targets["direct"]
    rows = [
        "| target | req/s | x direct | CPU us/req | p50 ms | p99 ms | added p50 / p99 ms | RSS idle MiB "
        "| RSS peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in report.targets.values():
        s = summary(target, direct)
        is_direct = target.name == "direct"
        added = "-" if is_direct else f"{num(s['added_p50_ms'], sign=True)} / {num(s['added_p99_ms'], sign=True)}"
        label = f"direct: {target.label}" if is_direct else target.label
        rows.append(f"| {label} | {num(s['rps'])} | {num(s['x_direct_rps'], 3)} | {num(s['cpu_us_per_request'], 0)} "
                    f"| {num(s['p50_ms'])} | {num(s['p99_ms'])} | {added} | {num(s['rss_idle_mib'], 1)} "
                    f"| {num(s['rss_peak_mib'], 1)} |")
    return rows


def pair_line(title: str, figures: dict[str, float]) -> str:
    names = {"rps": "req/s", "cpu_us_per_request": "CPU/req", "p50_ms": "p50", "p99_ms": "p99",
             "rss_peak_mib": "RSS peak"}
    return f"- {title} (median of per-round ratios): " + ", ".join(
        f"{names[k]} {num(v)}x" for k, v in figures.items() if not math.isnan(v))


def footer(report: Report) -> list[str]:
    c, t = report.config, report.targets
    proxies = [target for target in t.values() if target.name != "direct"]
    found = pairs(report)
    lines = []
    if "sidecar_vs_naive" in found:
        lines.append(pair_line("sidecar / naive", found["sidecar_vs_naive"]))
    if "scaling_2w_vs_1w" in found:
        lines.append(pair_line(f"sidecar 2 workers / 1 worker, same CPUs ({c['pinning']})", found["scaling_2w_vs_1w"]))
    lines += [
        f"- x direct: req/s over the direct req/s of the same round; added p50/p99: the same-round difference. "
        f"Median over {c['rounds']} round(s); targets measured in a rotated order each round",
        f"- upstream: {c['upstream']}; {c['pinning']}",
        f"- {c['sidecar_setup']}",
        f"- load: throughput by {c['throughput_tool']} ({c['connections']} keep-alive connections), latency by "
        f"{c['latency_tool']} at {c['rate']:g} req/s; {c['warmup_s']} s warm-up per target and round",
        "- CPU us/req: utime+stime from /proc over the throughput run, summed over the proxy's processes; RSS "
        "summed likewise (idle: after start-up; peak: max sampled every 50 ms during the throughput run)",
        "- CPU busy during the throughput run, % of one core: "
        + ", ".join(f"{p.name} {num(figure(p, 'cpu_busy_pct'), 0)}" for p in proxies),
        "- other processes' CPU during each proxy's throughput run, % of one core, on its CPUs / on all CPUs: "
        + ", ".join(f"{p.name} {num(figure(p, 'others_busy_pct'), 0)} / {num(figure(p, 'machine_others_busy_pct'), 0)}"
                    for p in proxies),
    ]
    for p in proxies:
        if p.samples and len(p.samples[-1].busy_pct_by_pid) > 1:
            shares = ", ".join(f"{num(v, 0)}%" for v in p.samples[-1].busy_pct_by_pid.values())
            lines.append(f"- {p.name}: busy per process in the last round (root first): {shares}")
    if "sidecar" in t:
        lines.append(f"- sidecar access log: {report.access_log_lines:,} lines written")
    lines += [f"- note: {note}" for note in report.notes]
    problems = failures(report)
    lines.append(f"- problems: {'; '.join(problems)}" if problems else "- every request got a 2xx response")
    return lines


def idle_rows(report: Report) -> list[str]:
    measured = [t for t in report.targets.values() if t.idle is not None]
    if not measured:
        return []
    count = measured[0].idle.connections if measured[0].idle else 0
    rows = [
        "",
        f"Idle keep-alive connections: {count:,} per proxy, each after one request, all open at once; RSS summed "
        "over the proxy's processes, read before the first and 1 s after the last connection opened.",
        "",
        "| target | open | RSS before MiB | RSS with connections MiB | KiB per connection | seconds to open |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target in measured:
        r = target.idle
        assert r is not None
        rows.append(f"| {target.label} | {r.open_at_end:,} | {num(r.rss_before_mib, 1)} | {num(r.rss_after_mib, 1)} "
                    f"| {num(r.kib_per_connection, 1)} | {num(r.open_seconds, 1)} |")
    return rows


def markdown(report: Report) -> str:
    return "\n".join([header(report), "", *table_rows(report), "", *footer(report), *idle_rows(report)])


# --- JSON and problems -----------------------------------------------------------------------------------


def to_json(report: Report) -> str:
    def clean(value: Any) -> Any:
        # NaN is not JSON: say "not measured" as null.
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    direct = report.targets["direct"]
    data = {
        "config": report.config,
        "machine": report.machine,
        "targets": {name: {**asdict(t), "median": summary(t, direct)} for name, t in report.targets.items()},
        "pairs": pairs(report),
        "notes": report.notes,
        "access_log_lines": report.access_log_lines,
        "problems": failures(report),
    }
    return json.dumps(clean(data), indent=2)


def failures(report: Report) -> list[str]:
    """Everything that makes the numbers suspect: failed or non-2xx requests, a dead or complaining proxy,
    idle connections that did not stay open."""
    found = []
    for target in report.targets.values():
        for i, sample in enumerate(target.samples, 1):
            for phase, result in (("throughput", sample.throughput), ("latency", sample.latency)):
                if result.non_2xx or result.errors:
                    found.append(f"{target.name} round {i} {phase}: {result.non_2xx} non-2xx responses, "
                                 f"{result.errors} failed requests")
        if not target.alive:
            found.append(f"{target.name} died during the run")
        elif target.processes_alive != target.processes_expected:
            found.append(f"{target.processes_alive} of {target.processes_expected} {target.name} workers alive")
        found.extend(f"{target.name} log: {line}" for line in target.log_problems)
        idle = target.idle
        if idle is not None and min(idle.answered, idle.open_at_end) < idle.connections:
            found.append(f"{target.name} idle connections: {idle.answered} of {idle.connections} answered, "
                         f"{idle.open_at_end} still open")
    return found
