"""From config text to a `Config`: parse, expand env, validate, merge defaults.

Errors are raised as `ConfigError` with the key path and line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from yarl import URL

from sidecar.config import schema
from sidecar.config.hosts import host_of
from sidecar.config.model import Address, Config, Endpoint, RouteSpec, RouteTimeouts, UpstreamSpec
from sidecar.config.source import ConfigError, Lines, expand_env, parse_yaml, redact, where
from sidecar.config.units import decode_hook

T = TypeVar("T")
_MSGSPEC_PATH = re.compile(r"^(.*) - at `(\$[^`]*)`$")
_FIELD_NAME = re.compile(r"field `([^`]+)`")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    return parse_config(text, os.environ if env is None else env)


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    raw, lines = parse_yaml(text)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of keys (listen, admin, defaults, upstreams, routes)")
    secrets: set[str] = set()
    data = expand_env(raw, env, lines, secrets=secrets)
    if isinstance(data.get("admin"), dict) and isinstance(data["admin"].get("token"), str):
        secrets.add(data["admin"]["token"])  # a token written inline is a secret too
    try:
        document = _convert(data, schema.Document, "$", lines, data)
        config = _build(document, data, lines)
    except ConfigError as exc:
        raise ConfigError(redact(str(exc), secrets)) from None
    return dataclasses.replace(config, secrets=frozenset(s for s in secrets if s))


def _convert(value: Any, kind: type[T], path: str, lines: Lines, root: Any = None) -> T:
    try:
        return msgspec.convert(value, kind, strict=False, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), path, lines, root)) from None


def _explain(message: str, base: str, lines: Lines, root: Any) -> str:
    found = _MSGSPEC_PATH.match(message)
    problem, path = (found.group(1), found.group(2)) if found else (message, "$")
    path = base + path[1:]
    if path.startswith("$.upstreams[...]") and isinstance(root, dict):
        path = _name_upstream(path, root.get("upstreams"))
    field = _FIELD_NAME.search(problem)
    if field and problem.startswith("Object contains unknown field"):
        return f"unknown key `{field.group(1)}` {where(f'{path}.{field.group(1)}', lines)}"
    if field and problem.startswith("Object missing required field"):
        return f"missing key `{field.group(1)}` {where(path, lines)}"
    return f"{problem} {where(path, lines)}"


def _name_upstream(path: str, upstreams: Any) -> str:
    """msgspec writes dict keys as `[...]`; find which upstream failed to name it."""
    if isinstance(upstreams, dict):
        for name, value in upstreams.items():
            try:
                msgspec.convert(value, schema.Upstream, strict=False, dec_hook=decode_hook)
            except msgspec.ValidationError:
                return path.replace("[...]", f".{name}", 1)
    return path


def _build(document: schema.Document, data: dict[str, Any], lines: Lines) -> Config:
    upstreams = {
        name: UpstreamSpec(
            name,
            tuple(
                _endpoint(url, f"$.upstreams.{name}.endpoints[{i}]", lines, spec.keepalive_timeout)
                for i, url in enumerate(spec.endpoints)
            ),
            spec.outlier,
        )
        for name, spec in document.upstreams.items()
    }
    main = _address(document.listen, "$.listen", lines)
    admin = _address(document.admin.listen, "$.admin.listen", lines)
    if not _is_loopback(admin.host) and not document.admin.token:
        raise ConfigError(
            f"admin.listen {admin} is not a loopback address: the admin API can change breakers and reload the "
            f"config, so set admin.token (e.g. ${{SIDECAR_ADMIN_TOKEN}}) or listen on 127.0.0.1 "
            f"{where('$.admin.listen', lines)}"
        )
    defaults = data.get("defaults") or {}
    routes: list[RouteSpec] = []
    names: set[str] = set()
    claimed: dict[tuple[Address, str | None, str], str] = {}
    raw_routes = data.get("routes") or []
    for index, route in enumerate(document.routes):
        path = f"$.routes[{index}]"
        if route.name in names:
            raise ConfigError(f"duplicate route name `{route.name}` {where(path + '.name', lines)}")
        names.add(route.name)
        if route.upstream not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none defined"
            raise ConfigError(
                f"unknown upstream `{route.upstream}` (known: {known}) {where(path + '.upstream', lines)}"
            )
        if route.match is None and route.listen is None:
            raise ConfigError(f"route `{route.name}` needs `match` or its own `listen` {where(path, lines)}")
        listen = main if route.listen is None else _address(route.listen, path + ".listen", lines)
        match = route.match or schema.Match()
        host = host_of(match.host) if match.host else None
        if host is not None and host.strip("[]") == "":
            raise ConfigError(f"invalid match.host {match.host!r}: write a host name or IP address "
                              f"{where(path + '.match.host', lines)}")
        key = (listen, host, match.path_prefix)
        if key in claimed:
            raise ConfigError(
                f"route `{route.name}` matches the same listener, host and path_prefix as `{claimed[key]}` "
                f"{where(path, lines)}"
            )
        claimed[key] = route.name
        # Merged from the raw dicts, not from `route` and `document.defaults`: once decoded, a
        # field the route left out cannot be told from one it set to the default value.
        policies = {
            section: _merged(section, defaults, raw_routes[index], f"{path}.{section}", lines)
            for section in schema.POLICY_SECTIONS
        }
        if route.delivery is not None and route.delivery.backoff.base > route.delivery.backoff.max:
            raise ConfigError(f"delivery.backoff.base is above backoff.max {where(path + '.delivery.backoff', lines)}")
        total = policies["timeouts"].total
        if route.delivery is not None and route.delivery.lease is not None and route.delivery.lease < 2 * total:
            # Shorter, another worker could take over a message while its attempt is still running.
            raise ConfigError(f"delivery.lease must be at least twice timeouts.total ({2 * total:g}s) "
                              f"{where(path + '.delivery.lease', lines)}")
        routes.append(RouteSpec(
            name=route.name, listen=listen, host=host, path_prefix=match.path_prefix,
            strip_prefix=route.strip_prefix, upstream=upstreams[route.upstream], fallback=route.fallback,
            websocket=route.websocket,
            delivery=route.delivery,
            cache=route.cache,
            **policies,
        ))
    return Config(
        listen=main,
        admin_listen=admin,
        admin_token=document.admin.token or None,
        metrics_listen=(
            _address(document.metrics.listen, "$.metrics.listen", lines) if document.metrics.listen else None
        ),
        log=document.log,
        shutdown=document.shutdown,
        server=document.server,
        upstreams=tuple(upstreams.values()),
        routes=tuple(routes),
        delivery=document.delivery,
    )


def _merged(section: str, defaults: dict[str, Any], route: dict[str, Any], path: str, lines: Lines) -> Any:
    """A route's section over the defaults' section, field by field (nested maps too)."""
    merged = _deep_merge(defaults.get(section) or {}, route.get(section) or {})
    policy: Any = _convert(merged, schema.POLICY_SECTIONS[section], path, lines)
    if isinstance(policy, schema.Timeouts):
        for name in ("connect", "total", "idle", "per_try"):
            if getattr(policy, name) is not None and getattr(policy, name) <= 0:
                raise ConfigError(f"timeouts.{name} must be above zero {where(path + '.' + name, lines)}")
        per_try = policy.total if policy.per_try is None else policy.per_try
        policy = RouteTimeouts(connect=policy.connect, per_try=per_try, total=policy.total, idle=policy.idle)
    if isinstance(policy, schema.Retries) and policy.backoff.base > policy.backoff.max:
        raise ConfigError(f"retries.backoff.base is above backoff.max {where(path + '.backoff', lines)}")
    return policy


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _address(text: str, path: str, lines: Lines) -> Address:
    found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if found is None:
        raise ConfigError(
            f"invalid listen address {text!r}: write host:port, e.g. 127.0.0.1:15001 {where(path, lines)}"
        )
    host = found.group(1) or found.group(3)
    port = int(found.group(2) or found.group(4))
    if port > 65535:
        raise ConfigError(f"port {port} is out of range {where(path, lines)}")
    return Address(host, port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(text: str, path: str, lines: Lines, keepalive: float) -> Endpoint:
    try:
        url = URL(text)
    except ValueError as exc:
        raise ConfigError(f"invalid endpoint URL {text!r}: {exc} {where(path, lines)}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"endpoint {text!r} must be an http:// or https:// URL with a host {where(path, lines)}")
    if url.raw_query_string or url.raw_fragment or url.raw_user:
        raise ConfigError(f"endpoint {text!r} must not carry a query, fragment or credentials {where(path, lines)}")
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    authority = host if url.explicit_port is None else f"{host}:{url.explicit_port}"
    path = url.raw_path.rstrip("/")
    base = f"{url.scheme}://{authority}{path}"
    return Endpoint(
        base=base, authority=authority, host=url.raw_host or "", port=url.port or 80, tls=url.scheme == "https",
        path=path, keepalive=float(keepalive),
    )
