"""The `sidecar` command as a user runs it: a real process, real ports, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Upstream
from tests.processes import free_port, get, wait_ready


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_version_is_printed() -> None:
    from sidecar import __version__

    result = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"sidecar {__version__}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_run_forwards_traffic_and_exits_zero_on_sigterm(
    tmp_path: Path, upstream: Upstream, stopper: list[subprocess.Popen[str]], loop: str
) -> None:
    port, admin_port = free_port(), free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
shutdown: {{drain_delay: 100ms, timeout: 2s}}
upstreams:
  up: {{endpoints: ["${{UP_URL}}"]}}
routes:
  - {{name: main, match: {{path_prefix: /svc/}}, upstream: up, strip_prefix: true}}
""")
    process = sidecar("run", "--loop", loop, env={"SIDECAR_CONFIG": str(config), "UP_URL": upstream.url})
    stopper.append(process)
    admin = f"http://127.0.0.1:{admin_port}"

    await asyncio.to_thread(wait_ready, admin, process)
    # Idle memory: frozenlist's C extension would bring in the C++ runtime (~1 MiB resident).
    assert "libstdc++" not in Path(f"/proc/{process.pid}/maps").read_text()
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/svc/hello?x=1")
    assert (status, body) == (200, b"GET /hello?x=1")
    status, metrics = await asyncio.to_thread(get, admin + "/metrics")
    assert b'sidecar_requests_total{code="200",method="GET",route="main"} 1.0' in metrics
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0


def test_run_with_a_broken_config_exits_one_with_the_message(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listen: 127.0.0.1:0\nroutes:\n  - {name: x, upstream: nope, match: {path_prefix: /}}\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "unknown upstream `nope`" in result.stderr and "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_without_a_config_says_how_to_give_one() -> None:
    env = {key: value for key, value in os.environ.items() if key != "SIDECAR_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "sidecar", "run"], capture_output=True, text=True, timeout=30,
                            env=env)
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_a_port_in_use_is_reported_plainly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "sidecar.yaml"
        config.write_text(f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:0}}\n")
        result = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


async def test_demo_serves_its_misbehaving_upstream_and_stops_on_ctrl_c(
    stopper: list[subprocess.Popen[str]],
) -> None:

    port, admin_port, upstream_port = free_port(), free_port(), free_port()
    process = sidecar("demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}",
                      "--upstream", f"127.0.0.1:{upstream_port}")
    stopper.append(process)
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{admin_port}", process)
    base = f"http://127.0.0.1:{port}"
    assert await asyncio.to_thread(get, base + "/demo/hello") == (200, b"hello from the demo upstream\n")
    status, body = await asyncio.to_thread(get, base + "/nowhere/")
    assert status == 502 and b'"connect_failure"' in body
    status, body = await asyncio.to_thread(get, base + "/elsewhere")
    assert status == 404 and b'"no_route"' in body
    # Half the attempts fail; GETs are retried once and three failures in a row open the
    # route's breaker: every answer is the upstream's own or the breaker's fail-fast.
    for _ in range(20):
        status, body = await asyncio.to_thread(get, base + "/demo/flaky")
        assert (status, body) in ((200, b"demo upstream: lucky this time\n"),
                                  (503, b"demo upstream: unlucky this time\n")) or b'"circuit_open"' in body
    with urllib.request.urlopen(base + "/demo/events", timeout=5) as stream:
        assert stream.readline() == b"id: 1\n"
        assert stream.readline() == b"data: tick 1\n"
    # The cache, as the printed commands show it: MISS, HIT, then the last good answer while it fails.
    labels, bodies = [], []
    for method, path, headers in [("GET", "/demo/cached", {}), ("GET", "/demo/cached", {}),
                                  ("POST", "/demo/cached/down", {}),
                                  ("GET", "/demo/cached", {"Cache-Control": "no-cache"})]:
        request = urllib.request.Request(base + path, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            labels.append(response.headers["x-sidecar-cache"])
            bodies.append(response.read())
            if labels[-1] == "STALE":
                assert response.headers["x-sidecar-stale-reason"] in ("status_503", "circuit_open")
    assert labels == ["MISS", "HIT", "BYPASS", "STALE"]
    assert bodies[0] == bodies[1] == bodies[3] and bodies[0].startswith(b"demo upstream: the time is ")
    process.send_signal(signal.SIGINT)
    out, _ = await asyncio.to_thread(process.communicate, timeout=15)
    assert process.returncode == 0
    assert f"curl -i {base}/demo/flaky" in out and f"http://127.0.0.1:{admin_port}/metrics" in out
    assert f"curl -X POST {base}/demo/cached/down" in out
