"""The one timestamp format: UTC, milliseconds truncated, `Z`."""

from __future__ import annotations

from datetime import UTC, datetime

from sidecar.telemetry.timestamps import IsoPerSecond, iso


def test_iso_is_utc_with_milliseconds() -> None:
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(1_795_000_000.1239) == "2026-11-18T11:06:40.123Z"
    moment = 1_795_000_000.5
    assert iso(moment) == datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def test_iso_per_second_agrees_with_iso_across_second_boundaries() -> None:
    cached = IsoPerSecond()
    for moment in [1_795_000_000.0, 1_795_000_000.999, 1_795_000_001.0, 1_795_000_001.25, 1_795_000_060.5]:
        assert cached(moment) == iso(moment)
