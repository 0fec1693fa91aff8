"""Any config document: `sidecar check` answers 0 or 1 with a message, never a traceback."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.cli import main
from sidecar.config import ConfigError, parse_config

KEYS = [
    "listen", "admin", "token", "log", "access", "sample", "query", "metrics", "shutdown", "drain_delay", "timeout",
    "server", "listen_max_connections", "header_timeout", "defaults", "timeouts", "connect", "per_try", "total",
    "idle", "retries", "attempts", "on", "backoff", "base", "max", "budget", "ratio", "min_per_second",
    "circuit_breaker", "enabled", "failure_threshold", "failure_rate", "threshold", "window", "limits",
    "max_concurrent", "max_body", "upstreams", "endpoints", "outlier", "routes", "name", "match", "path_prefix",
    "host", "upstream", "strip_prefix", "fallback", "status", "body", "headers", "x", "",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1s", "0ms", "5m", "64KiB", "127.0.0.1:0", "http://127.0.0.1:1", "/", "${X}", "${X:-1}",
                     "$$", "connect-failure", "5xx", "-1", "1e999", "\x00", "[::1]:0", "ftp://x"]),
    st.text(max_size=20),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    ),
    max_leaves=30,
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_document_is_accepted_or_refused_with_a_config_error(document: object) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        parse_config(text, {"X": "1"})
    except ConfigError as exc:
        assert str(exc)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_refused_with_a_config_error(raw: bytes | str) -> None:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        parse_config(text, {})
    except ConfigError as exc:
        assert str(exc)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(DOCUMENTS)
def test_sidecar_check_exits_zero_or_one_with_a_message(tmp_path: Path, document: object) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(path)])
    assert code in (0, 1)
    assert "Traceback" not in err.getvalue()
    assert (out.getvalue() if code == 0 else err.getvalue()).strip()


def test_admin_on_a_non_loopback_address_needs_a_token() -> None:
    base = "upstreams: {up: {endpoints: [http://127.0.0.1:1]}}\n"
    try:
        parse_config(base + "admin: {listen: 0.0.0.0:9901}\n", {})
    except ConfigError as exc:
        assert "not a loopback address" in str(exc) and "admin.token" in str(exc) and "line 2" in str(exc)
    else:
        raise AssertionError("a non-loopback admin listener without a token was accepted")
    assert parse_config(base + "admin: {listen: 0.0.0.0:9901, token: t}\n", {}).admin_token == "t"
    assert parse_config(base + "admin: {listen: '[::1]:9901'}\n", {}).admin_listen.host == "::1"


CANONICAL = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy" / "sidecar.yaml").read_text()
                           .replace("\n    on:", "\n    'on':"))


def _leaf_paths(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _leaf_paths(value, (*path, key))] + [path]
    if isinstance(node, list):
        return [p for index, value in enumerate(node) for p in _leaf_paths(value, (*path, index))] + [path]
    return [path]


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_valid_config_with_any_value_changed_is_accepted_or_refused_with_a_config_error(data: st.DataObject) -> None:
    document = yaml.safe_load(yaml.safe_dump(CANONICAL))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _leaf_paths(document) if p]
        path = data.draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = data.draw(DOCUMENTS)
    try:
        parse_config(yaml.safe_dump(document), {"X": "1"})
    except ConfigError as exc:
        assert str(exc)
