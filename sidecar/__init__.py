"""sidecar: a resilience proxy that runs next to every service."""

__version__ = "0.1.0"
