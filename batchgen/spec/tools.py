"""Tool schemas (``input.tools``): checked at spec load, normalized to the OpenAI function form.

A tool is ``{type: function, function: {name, description?, parameters?}}``; the bare inner form
``{name, description?, parameters?}`` is accepted and wrapped. ``parameters`` must be a valid JSON
Schema of an object. No torch here.
"""

from __future__ import annotations

import re
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_tools(tools: tuple[dict[str, Any], ...], key: str) -> tuple[dict[str, Any], ...]:
    """The tools in the OpenAI form; raises ValueError naming ``key[i]`` and what is wrong."""
    from batchgen.spec.schemas import schema_error

    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{key}[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where}: a tool is a mapping, got {type(tool).__name__}")
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise ValueError(f"{where}: type must be 'function', got {tool.get('type')!r}")
            extra = set(tool) - {"type", "function"}
            fn = tool["function"]
        else:
            extra, fn = set(), tool
        if extra:
            raise ValueError(f"{where}: unknown keys {sorted(extra)}")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function: must be a mapping")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ValueError(f"{where}.function: unknown keys {sorted(unknown)}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.function.name: {name!r} is not a tool name "
                             "(1-64 letters, digits, _ . -)")
        if name in names:
            raise ValueError(f"{where}.function.name: {name!r} is given twice")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON Schema mapping")
        problem = schema_error(params)
        if problem:
            raise ValueError(f"{where}.function.parameters: not a valid JSON Schema: {problem}")
        if params.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters: must describe an object "
                             f"(type: object), got type {params.get('type')!r}")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return tuple(out)


def call_schema(tools: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The JSON Schema of one call of one of ``tools``: {"name": ..., "arguments": {...}}.
    Each tool's parameters sit at ``arguments``, so their local refs (``#/$defs/city``, ``#``)
    are moved there with them."""
    def option(tool: dict[str, Any], at: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]},
                           "arguments": _moved(tool["function"]["parameters"], at)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if len(tools) == 1:
        return option(tools[0], "/properties/arguments")
    return {"anyOf": [option(t, f"/anyOf/{i}/properties/arguments") for i, t in enumerate(tools)]}


# Keywords whose values are data, not schemas: a "$ref" inside them is a value to match.
_DATA_KEYWORDS = ("const", "enum", "default", "examples")


def _moved(schema: Any, at: str) -> Any:
    """``schema`` with every ``$ref`` that points into itself (``#`` or ``#/...``) rewritten to
    point into its new place ``at`` (a JSON pointer) in an enclosing schema. Values of data
    keywords are left as they are, and so is a subschema with its own ``$id`` (its refs resolve
    against that)."""
    if isinstance(schema, list):
        return [_moved(v, at) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + at + value[1:]
        elif key in _DATA_KEYWORDS or (isinstance(value, dict) and "$id" in value):
            out[key] = value
        else:
            out[key] = _moved(value, at)
    return out
