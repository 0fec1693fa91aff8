"""What the sidecar tells operators: Prometheus metrics, operational events, the access log and
JSON process logs."""
