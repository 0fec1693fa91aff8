"""The admin listener: health, readiness, metrics and the versioned admin API, on its own port."""

from sidecar.admin.app import Readiness, admin_app, health_and_metrics

__all__ = ["Readiness", "admin_app", "health_and_metrics"]
