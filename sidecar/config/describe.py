"""The effective config in plain data, as `sidecar check` prints it (units as a person writes them)."""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar.config.delivery import lease_of
from sidecar.config.model import Config, RouteSpec
from sidecar.config.schema import POLICY_SECTIONS
from sidecar.config.source import redact
from sidecar.config.units import Duration, Size


def plain(value: Any) -> Any:
    if isinstance(value, Duration | Size):
        return str(value)
    if isinstance(value, msgspec.Struct):
        return {name: plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value


def describe(config: Config) -> dict[str, Any]:
    """What `sidecar check` and /api/v1/routes show; secrets from the environment are redacted."""
    shown: dict[str, Any] = _redacted(_describe(config), config.secrets)
    return shown


def _redacted(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {key: _redacted(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item, secrets) for item in value]
    return value


def _describe(config: Config) -> dict[str, Any]:
    return {
        "listen": str(config.listen),
        # The admin token is a secret: say whether one is set, never what it is.
        "admin": {"listen": str(config.admin_listen), "token": "<redacted>" if config.admin_token else None},
        "metrics": {"listen": str(config.metrics_listen) if config.metrics_listen else None},
        "log": plain(config.log),
        "shutdown": plain(config.shutdown),
        "server": plain(config.server),
        "routes": [
            {
                "name": route.name,
                "listen": str(route.listen),
                "match": {"path_prefix": route.path_prefix, "host": route.host},
                "strip_prefix": route.strip_prefix,
                "websocket": route.websocket,
                "upstream": {
                    "name": route.upstream.name,
                    "endpoints": [e.base for e in route.upstream.endpoints],
                    "outlier": plain(route.upstream.outlier),
                },
                **{section: plain(getattr(route, section)) for section in POLICY_SECTIONS},
                "fallback": plain(route.fallback),
                "delivery": _delivery(route),
                "cache": plain(route.cache),
            }
            for route in config.routes
        ],
        "delivery": plain(config.delivery),
    }


def _delivery(route: RouteSpec) -> dict[str, Any] | None:
    """A route's delivery section, with the lease in force worked out when it is left to the default."""
    if route.delivery is None:
        return None
    lease = Duration(lease_of(route.delivery, route.timeouts.total))
    return {**plain(route.delivery), "lease": str(lease)}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors; published as docs/config.schema.json."""
    from sidecar.config.schema import Document
    from sidecar.config.units import schema_hook

    schema = msgspec.json.schema(Document, schema_hook=schema_hook)
    schema["title"] = "sidecar config"
    return schema
