"""Helpers for tests that run the sidecar as a real process: free ports, a one-route config, readiness."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(admin: str, process: subprocess.Popen[str] | subprocess.Popen[bytes], limit: float = 15.0) -> None:
    """Poll /readyz until it answers 200 (bounded), failing early if the process died."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sidecar exited early: {process.communicate()}")
        try:
            if get(admin + "/readyz", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("sidecar did not become ready")


@dataclass(frozen=True)
class ProcessConfig:
    path: Path
    port: int
    admin_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def one_route_config(directory: Path, upstream_url: str, extra: str = "", route_extra: str = "") -> ProcessConfig:
    """A config file on free loopback ports sending every path to `upstream_url`; `extra` adds top-level
    keys, `route_extra` keys of the route (`cache: {}`)."""
    config = ProcessConfig(directory / "sidecar.yaml", free_port(), free_port())
    route = "name: main, match: {path_prefix: /}, upstream: up" + (f", {route_extra}" if route_extra else "")
    config.path.write_text(
        f"listen: 127.0.0.1:{config.port}\nadmin: {{listen: 127.0.0.1:{config.admin_port}}}\n{extra}\n"
        f'upstreams: {{up: {{endpoints: ["{upstream_url}"]}}}}\n'
        f"routes: [{{{route}}}]\n"
    )
    return config
