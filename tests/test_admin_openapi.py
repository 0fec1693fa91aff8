"""The admin server against its OpenAPI document, checked by schemathesis (real HTTP, generated cases)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import SidecarFactory, Upstream, route_yaml

SPEC = Path(__file__).resolve().parent.parent / "docs" / "admin-openapi.yaml"


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_admin_api_conforms_to_its_openapi_document(
    sidecar_factory: SidecarFactory, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("schemathesis") is None and not Path(sys.executable).with_name("schemathesis").exists():
        pytest.skip("schemathesis is not installed (it is in the test extra)")
    monkeypatch.setenv("SIDECAR_STATE_DIR", str(tmp_path / "state"))  # the route queues: /api/v1/deliveries
    # A queued and cached route: /api/v1/deliveries has messages, DELETE /api/v1/cache a route to purge.
    proxy = await sidecar_factory('admin: {listen: 127.0.0.1:0, token: "t0ken"}\n'
                                  + route_yaml(upstream.url, "delivery: {methods: [POST]}\ncache: {}"),
                                  config_file=tmp_path / "sidecar.yaml")
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("schemathesis")), "run", str(SPEC), "--url", proxy.admin,
        "--checks", "all", "--max-examples", "25", "--seed", "1", "--no-color",
        "--exclude-path", "/api/v1/events",  # an endless stream; covered by tests/test_admin_api.py
        "-H", "Authorization: Bearer t0ken",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=110)
    assert process.returncode == 0, output.decode()[-6000:]
