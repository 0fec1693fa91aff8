"""The admin listener: health, readiness, metrics and the versioned admin API, on its own port."""

from sidecar.admin.app import admin_app, health_and_metrics
from sidecar.admin.context import AdminContext, Readiness

__all__ = ["AdminContext", "Readiness", "admin_app", "health_and_metrics"]
