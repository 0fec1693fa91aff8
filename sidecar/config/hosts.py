"""Host names as routes compare them: one rule for `match.host` in the config and the Host header.

`Example.COM:8080` -> `example.com`, `[::1]:15001` -> `[::1]`, and a bare IPv6 literal
(`::1`, only meaningful in the config) -> `[::1]`, so both sides meet in one form.
"""

from __future__ import annotations


def host_of(host: str) -> str:
    """The lower-case host without its port; IPv6 literals keep (or get) their brackets."""
    host = host.lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    colons = host.count(":")
    if colons == 0:
        return host
    if colons == 1:
        return host.split(":", 1)[0]
    return f"[{host}]"  # several colons and no brackets: an IPv6 literal without a port
