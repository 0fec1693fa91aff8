"""Running a sidecar: start, reload and stop (sidecar.py), the `--workers N` supervisor, the demo."""
