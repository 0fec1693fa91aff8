"""Config: parsed once, validated, turned into immutable typed objects."""

from sidecar.config.load import load_config, parse_config
from sidecar.config.model import Address, Config, Endpoint, RouteSpec, UpstreamSpec
from sidecar.config.source import ConfigError

__all__ = [
    "Address", "Config", "ConfigError", "Endpoint", "RouteSpec", "UpstreamSpec", "load_config", "parse_config",
]
