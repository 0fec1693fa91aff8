"""Config: the canonical file is accepted; every mistake gets a message with its key path and line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from sidecar.config import ConfigError, parse_config
from sidecar.config.describe import describe, json_schema
from sidecar.config.source import parse_yaml

ROOT = Path(__file__).resolve().parent.parent
CANONICAL = ROOT / "deploy" / "sidecar.yaml"


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check", str(path)],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
upstreams:
  up: {endpoints: [http://127.0.0.1:8081]}
routes:
  - name: main
    match: {path_prefix: /}
    upstream: up
"""


def test_canonical_config_is_accepted_and_check_prints_merged_policies() -> None:
    result = check(CANONICAL)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    payments, inventory = printed["routes"]
    assert payments["upstream"]["endpoints"] == ["http://127.0.0.1:8081"]
    assert payments["match"]["path_prefix"] == "/payments/" and payments["strip_prefix"] is True
    assert payments["retries"]["attempts"] == 3  # the route's own
    assert payments["retries"]["backoff"] == {"base": "25ms", "max": "250ms"}  # from defaults
    assert inventory["retries"]["attempts"] == 2
    assert inventory["listen"] == "127.0.0.1:15002" and inventory["match"]["path_prefix"] == "/"
    assert payments["timeouts"] == {"connect": "1s", "per_try": "5s", "total": "15s", "idle": "5m"}
    assert payments["circuit_breaker"]["failure_threshold"] == 5
    assert payments["limits"]["max_concurrent"] == 100


def test_env_variable_replaces_the_default(tmp_path: Path) -> None:
    result = check(CANONICAL, {"PAYMENTS_URL": "http://127.0.0.1:9999"})
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["routes"][0]["upstream"]["endpoints"] == ["http://127.0.0.1:9999"]


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("    upstream: up", "    upstream: up\n    retires: {attempts: 3}"),
     "unknown key `retires` at $.routes[0].retires (line 7)"),
    (GOOD + "defaults:\n  timeouts: {connect: 5}\n",
     "invalid duration 5: write a number with a unit (ms, s, m, h), e.g. 250ms or 5s "
     "at $.defaults.timeouts.connect (line 8)"),
    (GOOD + "defaults:\n  timeouts: {total: 3 seconds}\n",
     "invalid duration '3 seconds'"),
    (GOOD.replace("http://127.0.0.1:8081", '"${PAYMENTS_URL}"'),
     "environment variable PAYMENTS_URL is not set, at $.upstreams.up.endpoints[0] (line 2)"),
    (GOOD.replace("upstream: up", "upstream: payments"),
     "unknown upstream `payments` (known: up) at $.routes[0].upstream (line 6)"),
    (GOOD + "defaults:\n  retries: {attempts: 0}\n",
     "Expected `int` >= 1 at $.defaults.retries.attempts (line 8)"),
    (GOOD + "defaults:\n  retries: {on: [connect-failure, teapot]}\n",
     "at $.defaults.retries.on[1] (line 8)"),
    (GOOD.replace("  - name: main\n", "  - name: main\n    listen: localhost\n"),
     "invalid listen address 'localhost'"),
    (GOOD.replace("[http://127.0.0.1:8081]", "[ftp://127.0.0.1:8081]"),
     "must be an http:// or https:// URL with a host at $.upstreams.up.endpoints[0] (line 2)"),
    (GOOD.replace("[http://127.0.0.1:8081]", "[]"),
     "at $.upstreams.up.endpoints (line 2)"),
    (GOOD.replace("    match: {path_prefix: /}\n", ""),
     "route `main` needs `match` or its own `listen` at $.routes[0] (line 4)"),
    (GOOD + "  - {name: main, match: {path_prefix: /x/}, upstream: up}\n",
     "duplicate route name `main` at $.routes[1].name (line 7)"),
    (GOOD + "defaults:\n  retries: {backoff: {base: 1s, max: 100ms}}\n",
     "retries.backoff.base is above backoff.max"),
    (GOOD.replace("    upstream: up\n", "    upstream: up\n    timeouts: {total: 2s}\n    delivery: {lease: 3s}\n"),
     "delivery.lease must be at least twice timeouts.total (4s) at $.routes[0].delivery.lease (line 8)"),
    (GOOD.replace("match: {path_prefix: /}", 'match: {path_prefix: /, host: "[:8080"}'),
     "invalid match.host '[:8080': write a host name or IP address at $.routes[0].match.host (line 5)"),
    ("routes: [\n", "invalid YAML (line 2)"),
    ("- just\n- a list\n", "the config must be a YAML mapping"),
    (GOOD + "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "duplicate key `listen`"),
])
def test_broken_config_is_rejected_with_key_path_and_line(tmp_path: Path, text: str, message: str) -> None:
    result = check(write(tmp_path, text))
    assert result.returncode == 1
    assert result.stdout == ""
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.yaml")
    assert result.returncode == 1
    assert "cannot read config" in result.stderr and "Traceback" not in result.stderr


def test_route_sections_override_defaults_field_by_field() -> None:
    config = parse_config(textwrap.dedent("""
        defaults:
          timeouts: {connect: 250ms, total: 2s}
          retries: {attempts: 4, backoff: {base: 10ms, max: 1s}, max_body: 1MiB}
          circuit_breaker: {failure_threshold: 7}
        upstreams:
          up: {endpoints: ["http://127.0.0.1:8081/"]}
        routes:
          - name: main
            match: {path_prefix: /}
            upstream: up
            timeouts: {total: 3s}
            retries: {backoff: {max: 2s}, on: [timeout, 429]}
            circuit_breaker: {reset_timeout: 100ms, failure_rate: {threshold: 0.25}}
    """), {})
    route = config.routes[0]
    assert (route.timeouts.connect, route.timeouts.total, route.timeouts.per_try) == (0.25, 3.0, 3.0)
    assert route.retries.attempts == 4
    assert (route.retries.backoff.base, route.retries.backoff.max) == (0.01, 2.0)
    assert route.retries.on == ("timeout", 429)
    assert route.retries.max_body == 1024 * 1024
    assert route.circuit_breaker.failure_threshold == 7 and route.circuit_breaker.reset_timeout == 0.1
    assert route.circuit_breaker.failure_rate is not None
    assert (route.circuit_breaker.failure_rate.threshold, route.circuit_breaker.failure_rate.min_requests) == (0.25, 20)
    assert route.upstream.endpoints[0].base == "http://127.0.0.1:8081"


@pytest.mark.parametrize(("written", "loaded"), [
    ("[::1]", "[::1]"), ("[::1]:15001", "[::1]"), ("::1", "[::1]"), ("Example.COM:8080", "example.com"),
    ("api.internal", "api.internal"),
])
def test_match_host_loads_in_the_form_the_host_header_is_compared_in(written: str, loaded: str) -> None:
    config = parse_config(GOOD.replace("match: {path_prefix: /}", f'match: {{path_prefix: /, host: "{written}"}}'), {})
    assert config.routes[0].host == loaded


def test_env_expansion_covers_numbers_defaults_and_escapes() -> None:
    config = parse_config(textwrap.dedent("""
        defaults:
          limits: {max_concurrent: "${MAX:-7}"}
        upstreams:
          up: {endpoints: ["http://${HOST}:8081"]}
        routes:
          - {name: main, match: {path_prefix: "/$${literal}"}, upstream: up}
    """), {"HOST": "127.0.0.1"})
    route = config.routes[0]
    assert route.limits.max_concurrent == 7
    assert route.upstream.endpoints[0].base == "http://127.0.0.1:8081"
    assert route.path_prefix == "/${literal}"


def test_defaults_apply_when_the_config_gives_none() -> None:
    route = parse_config(GOOD, {}).routes[0]
    assert (route.timeouts.connect, route.timeouts.per_try, route.timeouts.total, route.timeouts.idle) == (
        1.0, 15.0, 15.0, 300.0)
    assert route.retries.on == ("connect-failure", "reset", 502, 503, 504)
    assert route.circuit_breaker.failure_on == ("connect-failure", "reset", "timeout", "5xx")


def test_the_published_json_schema_is_current_and_accepts_the_canonical_config() -> None:
    published = json.loads((ROOT / "docs" / "config.schema.json").read_text())
    current = json.loads(json.dumps(json_schema()))
    assert published == current, "regenerate with: sidecar schema > docs/config.schema.json"
    document, _ = parse_yaml(CANONICAL.read_text())  # YAML 1.2 booleans, as the sidecar reads it
    jsonschema.validate(document, published)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"routes": [{"name": "x", "upstream": "u", "retires": {}}]}, published)


def test_describe_matches_what_check_prints() -> None:
    config = parse_config(CANONICAL.read_text(), {})
    assert yaml.safe_load(check(CANONICAL).stdout) == json.loads(json.dumps(describe(config)))


def test_describe_shows_the_delivery_lease_in_force() -> None:
    config = parse_config("""
upstreams: {up: {endpoints: ["http://127.0.0.1:1"]}}
routes:
  - {name: default, match: {path_prefix: /a}, upstream: up, delivery: {}}
  - {name: set, match: {path_prefix: /b}, upstream: up, timeouts: {total: 1s}, delivery: {lease: 2500ms}}
  - {name: plain, match: {path_prefix: /c}, upstream: up}
""", {})
    shown = {route["name"]: route["delivery"] for route in describe(config)["routes"]}
    assert shown["default"]["lease"] == "40s"  # 2 x timeouts.total (15s) + 10s, worked out
    assert shown["set"]["lease"] == "2500ms" and shown["plain"] is None


def test_error_type_is_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("routes: 5", {})


def test_secrets_from_the_environment_never_show(tmp_path: Path) -> None:
    text = """
admin: {listen: 127.0.0.1:9901, token: "${SIDECAR_ADMIN_TOKEN}"}
upstreams:
  up: {endpoints: ["http://${UPSTREAM_HOST}:8081"]}
routes:
  - name: main
    match: {path_prefix: /}
    upstream: up
    fallback: {status: 503, headers: {X-Api-Key: "${PARTNER_API_KEY}"}}
"""
    env = {"UPSTREAM_HOST": "127.0.0.1", "SIDECAR_ADMIN_TOKEN": "tok-123456", "PARTNER_API_KEY": "key-987654"}
    result = check(write(tmp_path, text), env)
    assert result.returncode == 0, result.stderr
    assert "tok-123456" not in result.stdout and "key-987654" not in result.stdout
    assert result.stdout.count("<redacted>") == 2
    assert "http://127.0.0.1:8081" in result.stdout  # only secret-named variables hide
    broken = text.replace("upstream: up", "upstream: tok-123456")
    result = check(write(tmp_path, broken), env)
    assert result.returncode == 1 and "unknown upstream `<redacted>`" in result.stderr
    assert "tok-123456" not in result.stderr
