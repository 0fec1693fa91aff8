"""Circuit breaker: `circuit_breaker` parses and validates; the layer is a passthrough
until the breakers issue wraps each attempt in a pybreaker breaker here."""

from __future__ import annotations

from sidecar.call import Layer, passthrough
from sidecar.config.schema import CircuitBreaker


def breaker_layer(breaker: CircuitBreaker) -> Layer:
    return passthrough
