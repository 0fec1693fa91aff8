"""Policy state and decisions as plain objects: no I/O, no asyncio, no metrics.

Each takes its clock (or the current time) as an argument, so tests drive it with a fake
clock. The layers in `sidecar/layers/` adapt them to the request path.
"""
