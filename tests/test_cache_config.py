"""The route `cache:` section (sidecar/config/cache.py): its values, and through the real config loader."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.config.cache import Cache
from sidecar.config.describe import describe
from sidecar.config.units import decode_hook


def convert(value: object) -> Cache:
    return msgspec.convert(value, Cache, strict=False, dec_hook=decode_hook)


def test_defaults() -> None:
    cache = convert({})
    assert (cache.max_bytes, cache.max_entry) == (64 * 1024**2, 1024**2)
    assert (cache.stale_if_error, cache.stale_while_revalidate, cache.default_ttl) == (300, 0, 0)
    assert cache.coalesce is True
    assert [str(cache.max_bytes), str(cache.stale_if_error), str(cache.default_ttl)] == ["64MiB", "5m", "0ms"]


def test_units() -> None:
    cache = convert({"max_bytes": "8MiB", "max_entry": "256KiB", "stale_if_error": "1h",
                     "stale_while_revalidate": "30s", "default_ttl": "500ms", "coalesce": False})
    assert (cache.max_bytes, cache.max_entry, cache.stale_if_error) == (8 * 1024**2, 256 * 1024, 3600)
    assert (cache.stale_while_revalidate, cache.default_ttl, cache.coalesce) == (30, 0.5, False)


@pytest.mark.parametrize(("value", "message"), [
    ({"max_bytes": 0}, "cache.max_bytes must be at least 1 byte"),
    ({"max_byte": "1MiB"}, "unknown field `max_byte`"),
    ({"default_ttl": "60"}, "invalid duration '60'"),
    ({"max_entry": "lots"}, "invalid size 'lots'"),
    ({"coalesce": "yes"}, "Expected `bool`"),
])
def test_bad_values_are_refused_with_a_reason(value: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        convert(value)


CONFIG = """
upstreams:
  up: {endpoints: [http://127.0.0.1:8081]}
routes:
  - name: cached
    match: {path_prefix: /catalog/}
    upstream: up
    cache: {max_bytes: 8MiB, stale_if_error: 1h}
  - name: plain
    match: {path_prefix: /}
    upstream: up
"""


def test_a_route_opts_in_and_check_shows_its_cache() -> None:
    config = parse_config(CONFIG, {})
    cached, plain = config.routes
    assert cached.cache == Cache(max_bytes=8 * 1024**2, stale_if_error=3600)  # the rest defaulted
    assert plain.cache is None
    shown = {route["name"]: route["cache"] for route in describe(config)["routes"]}
    assert shown["plain"] is None
    assert shown["cached"] == {"max_bytes": "8MiB", "max_entry": "1MiB", "stale_if_error": "1h",
                               "stale_while_revalidate": "0ms", "default_ttl": "0ms", "coalesce": True}


def test_cache_is_per_route_not_a_default() -> None:
    with pytest.raises(ConfigError, match="unknown key `cache`"):
        parse_config(CONFIG + "defaults: {cache: {}}\n", {})


def test_a_bad_cache_value_names_its_route_and_line() -> None:
    message = r"cache.max_bytes must be at least 1 byte at \$\.routes\[0\]\.cache \(line 8\)"
    with pytest.raises(ConfigError, match=message):
        parse_config(CONFIG.replace("max_bytes: 8MiB", "max_bytes: 0"), {})
