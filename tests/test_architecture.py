"""The module map in the README, enforced: which package may import which, and where library
internals may be touched. Reads the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"

# Package (or top-level module) -> the sidecar packages it may import, besides itself.
# Outermost last: nothing may import runtime or cli, and the rooms import no room.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "errors": set(),
    "config": {"errors"},
    "policy": {"config", "errors"},
    "wire": {"config", "errors"},
    "telemetry": {"config", "errors", "wire"},
    "layers": {"config", "errors", "policy", "proxy", "telemetry"},
    "cache": {"config", "errors", "policy", "proxy", "telemetry", "wire"},
    "delivery": {"config", "errors", "policy", "proxy", "telemetry", "wire"},
    "proxy": {"config", "errors", "policy", "layers", "telemetry", "wire", "cache", "delivery"},
    "admin": {"config", "errors", "layers", "telemetry"},
    "runtime": {"__init__", "config", "errors", "policy", "layers", "telemetry", "wire", "proxy", "admin", "cache",
                "delivery"},
    "cli": {"__init__", "config", "errors", "policy", "layers", "telemetry", "wire", "proxy", "admin", "cache",
            "delivery", "runtime"},
    "__main__": {"cli"},
}
# Where a package may reach into another only through one narrow door.
NARROW: dict[str, dict[str, set[str]]] = {
    # Layers and rooms see a Call and a Response, never the proxy's listener or the client.
    "layers": {"proxy": {"sidecar.proxy.call"}},
    "cache": {"proxy": {"sidecar.proxy.call"}, "wire": {"sidecar.wire.headers", "sidecar.wire.answer"}},
    "delivery": {"proxy": {"sidecar.proxy.call"}, "wire": {"sidecar.wire.headers", "sidecar.wire.answer"}},
    # Telemetry folds tallies into prometheus-client through the wire's one module for that.
    "telemetry": {"wire": {"sidecar.wire.tallies"}},
}
# Library modules any package may import; everything else of these libraries is the wire's.
PUBLIC = {
    "aiohttp": {"aiohttp", "aiohttp.web", "aiohttp.typedefs"},
    "prometheus_client": {"prometheus_client", "prometheus_client.aiohttp", "prometheus_client.multiprocess",
                          "prometheus_client.metrics_core", "prometheus_client.registry"},
}
# Packages that hold plain policy: no HTTP library, no metrics library at all.
PURE = {"policy"}


def package_of(path: Path) -> str:
    parts = path.relative_to(SIDECAR).with_suffix("").parts
    return parts[0]


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sidecar":  # `from sidecar import x`: the package or a module x
                found.extend((f"sidecar.{alias.name}", node.lineno) for alias in node.names)
            else:
                found.append((node.module, node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(SIDECAR.rglob("*.py"))


def violations() -> list[str]:
    problems = []
    for path in sources():
        package = package_of(path)
        where = path.relative_to(SIDECAR.parent)
        for module, line in imports_of(path):
            top = module.split(".")[0]
            if top == "sidecar":
                parts = module.split(".")
                target = parts[1] if len(parts) > 1 else "__init__"
                if target == package or target == "__version__":  # the version is everyone's
                    continue
                if target not in ALLOWED.get(package, set()):
                    problems.append(f"{where}:{line}: {package} may not import {module}")
                    continue
                door = NARROW.get(package, {}).get(target)
                if door is not None and not any(module == d or module.startswith(d + ".") for d in door):
                    problems.append(f"{where}:{line}: {package} reaches {target} only through {sorted(door)}, "
                                    f"not {module}")
            elif top in PUBLIC and package != "wire" and module not in PUBLIC[top]:
                problems.append(f"{where}:{line}: {module} is a library internal: only sidecar/wire/ touches it")
            if package in PURE and top in ("aiohttp", "multidict", "prometheus_client", "pybreaker"):
                problems.append(f"{where}:{line}: {package} is plain policy and may not import {module}")
    return problems


def test_every_package_is_in_the_map() -> None:
    packages = {package_of(path) for path in sources()}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to the map (and the README's)"


def test_imports_follow_the_module_map() -> None:
    assert violations() == []


@pytest.mark.parametrize(("package", "line", "why"), [
    ("layers", "from sidecar.wire.upstream_client import UpstreamResponse", "may not import"),
    ("layers", "from sidecar.proxy.listener import Listener", "only through"),
    ("cache", "from sidecar.delivery.store import Store", "may not import"),
    ("admin", "from sidecar.runtime.sidecar import Sidecar", "may not import"),
    ("proxy", "from aiohttp.web_protocol import RequestHandler", "library internal"),
    ("policy", "import aiohttp", "plain policy"),
])
def test_the_check_catches_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str,
                                              line: str, why: str) -> None:
    """The check itself can fail: a copy of the tree with one bad import is refused."""
    copy = tmp_path / "sidecar"
    for path in sources():
        target = copy / path.relative_to(SIDECAR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (copy / package / "intruder.py").write_text(f"{line}\n")
    monkeypatch.setattr(sys.modules[__name__], "SIDECAR", copy)
    found = violations()
    assert any("intruder.py" in problem and why in problem for problem in found), found
