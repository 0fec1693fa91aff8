"""Concurrency limit (bulkhead) per route: `limits` parses and validates; the layer is a
passthrough until the breakers-and-limits issue gives it a semaphore."""

from __future__ import annotations

from sidecar.call import Layer, passthrough
from sidecar.config.schema import Limits


def limit_layer(limits: Limits) -> Layer:
    return passthrough
