"""Reading the config text: YAML with line numbers, then `${VAR}` expansion.

Every value keeps its key path (`$.routes[0].retries.attempts`, the same
notation msgspec uses) so any later error can name the key and its line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml


class ConfigError(Exception):
    """A config that cannot be used; the message names the key path and line."""


Lines = dict[str, int]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read the key `on:` as True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def where(path: str, lines: Lines) -> str:
    """`at $.a.b (line 7)`, falling back to the nearest parent that has a line."""
    probe = path
    while probe:
        if probe in lines:
            return f"at {path} (line {lines[probe]})"
        probe = re.sub(r"(\.[^.\[]*|\[[^\]]*\])$", "", probe) if probe != "$" else ""
    return f"at {path}"


def parse_yaml(text: str) -> tuple[Any, Lines]:
    """Parse YAML into plain data plus a map of key path -> 1-based line."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML{line}: {problem}") from None
    lines: Lines = {}
    if node is not None:
        _index(node, "$", lines)
    return data, lines


def _index(node: yaml.Node, path: str, lines: Lines) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise ConfigError(f"duplicate key `{key}` at {path}.{key} (line {key_node.start_mark.line + 1})")
            seen.add(key)
            _index(value_node, f"{path}.{key}", lines)
            lines[f"{path}.{key}"] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, f"{path}[{index}]", lines)


# Variables whose values are secrets: never printed by `check`, the admin API, logs or errors.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|PRIVATE|AUTH", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(text: str, secrets: frozenset[str] | set[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def expand_env(
    data: Any, env: Mapping[str, str], lines: Lines, path: str = "$", secrets: set[str] | None = None
) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in string values; `$$` is a literal `$`.

    Values of variables named like secrets (SECRET_NAME) are added to `secrets`.
    """
    if secrets is None:
        secrets = set()
    if isinstance(data, dict):
        return {key: expand_env(value, env, lines, f"{path}.{key}", secrets) for key, value in data.items()}
    if isinstance(data, list):
        return [expand_env(item, env, lines, f"{path}[{index}]", secrets) for index, item in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def substitute(found: re.Match[str]) -> str:
        if found.group(0) == "$$":
            return "$"
        name, default = found.group(1), found.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(f"environment variable {name} is not set, {where(path, lines)}")
            value = default
        if SECRET_NAME.search(name):
            secrets.add(value)
        return value

    return _ENV.sub(substitute, data)
