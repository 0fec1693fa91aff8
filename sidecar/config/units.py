"""Durations and sizes as written in the config ("250ms", "5s", "64KiB").

Both are float/int subclasses so the hot path uses them as plain numbers
(seconds, bytes), while `sidecar check` can print them back in the units a
person wrote.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Duration(float):
    """Seconds, parsed from a number with a unit: ms, s, m or h."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, str):
            found = _DURATION.match(value)
            if found:
                return cls(float(found.group(1)) * _DURATION_UNITS[found.group(2)])
        raise ValueError(
            f"invalid duration {value!r}: write a number with a unit (ms, s, m, h), e.g. 250ms or 5s"
        )

    def __str__(self) -> str:
        millis = round(self * 1000)
        for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
            if millis and millis % size == 0:
                return f"{millis // size}{unit}"
        return f"{float(self) * 1000:g}ms"


class Size(int):
    """Bytes, parsed from an integer with an optional unit: B, KiB, MiB or GiB."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: object) -> Size:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return cls(value)
        if isinstance(value, str):
            found = _SIZE.match(value)
            if found:
                return cls(int(found.group(1)) * _SIZE_UNITS[found.group(2)])
        raise ValueError(f"invalid size {value!r}: write bytes or a number with KiB, MiB or GiB, e.g. 64KiB")

    def __str__(self) -> str:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if self and self % size == 0:
                return f"{self // size}{unit}"
        return f"{int(self)}B"


def duration(text: str) -> Any:
    """A struct field default written as text, e.g. `connect: Duration = duration("1s")`."""
    return msgspec.field(default_factory=lambda: Duration.parse(text))


def size(text: str) -> Any:
    return msgspec.field(default_factory=lambda: Size.parse(text))


def decode_hook(kind: type, value: object) -> object:
    """msgspec dec_hook: builds Duration and Size from their text form."""
    if kind is Duration:
        return Duration.parse(value)
    if kind is Size:
        return Size.parse(value)
    raise NotImplementedError(f"no decoder for {kind!r}")


def schema_hook(kind: type) -> dict[str, Any]:
    """msgspec schema_hook: how Duration and Size look in the published JSON Schema."""
    if kind is Duration:
        return {"type": "string", "pattern": _DURATION.pattern, "description": "duration: a number with ms, s, m or h"}
    if kind is Size:
        return {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _SIZE.pattern}],
            "description": "size in bytes, or a number with KiB, MiB or GiB",
        }
    raise NotImplementedError(f"no schema for {kind!r}")
