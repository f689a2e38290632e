"""Loading a job spec: YAML text (a file, or an environment variable) → checked ``JobSpec``.

The YAML loader refuses duplicate keys and alias bombs; ``--set section.key=value`` overrides
are applied to the raw YAML before validation, so they get the same checks and messages; errors
name the file and the dotted key: ``job.yaml: generation.top_p: Input should be less than or
equal to 1, got 1.5``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from batchgen.errors import SpecError
from batchgen.spec.job import JobSpec

# A job spec is a few hundred YAML nodes. An alias bomb ("billion laughs": nested anchors, each
# alias repeating the one before) is a few hundred bytes that expand to billions of nodes once
# copied or validated; it is refused while still a small graph of shared nodes.
MAX_YAML_NODES = 100_000


class _Refused(Exception):
    """YAML that parses but is refused; the message lacks only where it came from."""


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (the second ``input:`` silently replaced the
    first) and documents larger than MAX_YAML_NODES with their aliases expanded."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable; SafeLoader says so below
                continue
            if duplicate:
                raise _Refused(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes the document has with aliases expanded, without expanding them: a
    depth-first walk that sizes each distinct node once (an alias is the same node object)."""
    sizes: dict[int, int] = {}
    started: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(
            node, yaml.MappingNode) else node.value if isinstance(node, yaml.SequenceNode) else []
        if finished:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise _Refused(
                    f"more than {MAX_YAML_NODES} YAML nodes once aliases are expanded (an alias "
                    "bomb?); write the spec out without nested &anchors/*aliases"
                )
        elif id(node) not in sizes:
            if id(node) in started:
                raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a node "
                               "that contains it")
            started.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise _Refused("nested too deeply") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars/lists."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected section.key=value")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = _load_yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {item!r}: value is not valid YAML: {_yaml_error(e)}") from None
        except _Refused as e:
            raise SpecError(f"--set {item!r}: {e}") from None
    return result


def _expect_mapping(raw: Any, source: str) -> None:
    if not isinstance(raw, dict):
        kind = {"str": "string", "int": "number", "float": "number"}.get(
            type(raw).__name__, type(raw).__name__)
        raise SpecError(f"{source}: expected a mapping of sections (input:, model:, output:, "
                        f"...), got a YAML {kind}")


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    _expect_mapping(raw, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None


SPEC_ENV_PREFIX = "env:"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load a YAML spec file, or with ``env:NAME`` the YAML text held in environment variable
    NAME (how ``batchgen submit`` ships a spec to a cluster inside the Ray job's runtime_env)."""
    if str(path).startswith(SPEC_ENV_PREFIX):
        name = str(path)[len(SPEC_ENV_PREFIX):]
        if name not in os.environ:
            raise SpecError(f"{path}: environment variable {name} is not set")
        text = os.environ[name]
    else:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise SpecError(f"{path}: cannot read job spec: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                            "save the file as UTF-8") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {_yaml_error(e)}") from None
    except _Refused as e:
        raise SpecError(f"{path}: {e}") from None
    raw = {} if raw is None else raw
    _expect_mapping(raw, str(path))  # before --set, which needs sections to set keys in
    return parse_spec(apply_overrides(raw, overrides), str(path))


def _yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, then what."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: "
    context = f" ({e.context})" if getattr(e, "context", None) else ""
    return f"{where}{e.problem}{context}"


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key" + _allowed_keys(err["loc"])
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                got = repr(err["input"])
                msg += f", got {got if len(got) <= 80 else got[:77] + '...'}"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
