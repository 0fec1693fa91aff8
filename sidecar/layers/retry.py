"""Retries: `retries` parses and validates; the layer is a passthrough (one attempt)
until the retries issue implements safe, budgeted, jittered retries here."""

from __future__ import annotations

from sidecar.call import Layer, passthrough
from sidecar.config.schema import Retries


def retry_layer(retries: Retries) -> Layer:
    return passthrough
