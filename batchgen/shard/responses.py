"""Reading a chat model's answer: its reasoning, and the tool calls it made.

Pure functions over the generated text; no torch. ``split_reasoning`` fills the ``reasoning``
column, ``parse_tool_calls`` the ``tool_calls`` column. Neither raises on what a model wrote:
a malformed call is returned as an error message for the row, never an exception.

Tool calls are read, in this order:

1. with the tokenizer's ``response_template`` (transformers' declarative response parsing,
   ``tokenizer.parse_response``), when the model ships one;
2. the JSON convention most open chat templates use (Qwen, Hermes, and batchgen's tiny model):
   ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, any number;
3. a generation that is one JSON call object ``{"name": ..., "arguments": {...}}`` (or a JSON
   list of them) and nothing else, as ``generation.structured.tool_call`` produces.

A call is ``{"name": str, "arguments": str}``, the arguments as canonical JSON text (sorted
keys, no spaces), so equal calls are equal strings.
"""

from __future__ import annotations

import json
import re
from typing import Any

from batchgen.shard.postprocess import first_schema_error

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def split_reasoning(text: str, end_marker: str, start_marker: str | None = None, *,
                    prompt: str | None = None) -> tuple[str | None, str]:
    """(reasoning, answer) of one generation of a reasoning model.

    The reasoning is the text before the first ``end_marker``, less a leading ``start_marker``
    and surrounding whitespace; the answer is the text after it, less leading whitespace.
    ``start_marker`` defaults to the opening tag of an end marker that is a closing tag
    (``</think>`` -> ``<think>``). Some chat templates write the start marker into the prompt,
    so the generation may or may not begin with it.

    No end marker in the text: the model never finished thinking (``max_new_tokens`` cut it, or
    it stopped early), so the whole text is reasoning and the answer is ``""``. Except when
    ``prompt``, the prompt the text was generated from, already ends with the end marker: its
    chat template closed the thinking itself (Qwen 3 with ``enable_thinking: false``), so there
    is no reasoning (None) and the whole text, less leading whitespace, is the answer.
    """
    if not end_marker:
        raise ValueError("end_marker must not be empty")
    if start_marker is None and end_marker.startswith("</"):
        start_marker = "<" + end_marker[2:]
    head, found, tail = text.partition(end_marker)
    if not found and prompt is not None and prompt.rstrip().endswith(end_marker):
        return None, text.lstrip()
    reasoning = head.strip()
    if start_marker and reasoning.startswith(start_marker):
        reasoning = reasoning[len(start_marker):].strip()
    return reasoning, tail.lstrip() if found else ""


def parse_tool_calls(text: str, tools: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
                     tokenizer: Any = None, *,
                     prefix: str = "") -> tuple[list[dict[str, str]] | None, str | None]:
    """(calls, None), or (None, error) for a generation whose calls cannot be read.

    No call in the text is ``([], None)``: a plain answer is not an error. With ``tools`` (in
    the form of ``input.tools``), each call must name one of them and its arguments must be
    valid against that tool's ``parameters`` schema. ``tokenizer``: a transformers tokenizer,
    used only when it has a ``response_template``; it should then get the text decoded with
    special tokens kept (templates may delimit calls with them), and ``prefix``, the prompt,
    for templates that start the assistant turn in the prompt. Errors name the call (counted
    from 1) and, when known, its tool: ``tool call 2 (get_weather): arguments: ...``.
    """
    tools = tuple(tools)
    raw: list[Any] | None = None
    if tokenizer is not None and getattr(tokenizer, "response_template", None) is not None:
        raw, error = _template_calls(text, tools, tokenizer, prefix)
        if error is not None:
            return None, error
    if not raw:
        raw, error = _tagged_calls(text)
        if error is not None:
            return None, error
    if not raw:
        raw = _bare_calls(text)
    calls = []
    for n, value in enumerate(raw, start=1):
        call, error = _call(value, n, tools)
        if error is not None:
            return None, error
        calls.append(call)
    return calls, None


def _template_calls(text: str, tools: tuple[dict[str, Any], ...], tokenizer: Any,
                    prefix: str) -> tuple[list[Any] | None, str | None]:
    try:
        message = tokenizer.parse_response(text, prefix=prefix, tools=list(tools) or None)
    except Exception as e:  # noqa: BLE001 - the template failing on this text is this row's error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"tool calls: the tokenizer's response template cannot parse the text: {first}"
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    return list(calls or []), None


def _tagged_calls(text: str) -> tuple[list[Any], str | None]:
    """The values of the ``<tool_call>`` blocks, JSON-decoded; a block that is not JSON, or one
    opened and never closed (cut by ``max_new_tokens``), is an error."""
    values = []
    blocks = _BLOCK.findall(text)
    for n, block in enumerate(blocks, start=1):
        try:
            values.append(json.loads(block))
        except json.JSONDecodeError as e:
            return [], f"tool call {n}: invalid JSON: {e.msg} at char {e.pos}"
    rest = _BLOCK.sub("", text)
    if _OPEN in rest:
        return [], (f"tool call {len(blocks) + 1}: {_OPEN} without {_CLOSE} "
                    "(cut off by max_new_tokens?)")
    return values, None


def _bare_calls(text: str) -> list[Any]:
    """The text as one JSON call object or a list of them; [] when it is anything else (a plain
    answer, or JSON that is not a call)."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return []
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    if items and all(isinstance(v, dict) and "name" in v
                     and ("arguments" in v or "parameters" in v) for v in items):
        return items
    return []


def _call(value: Any, n: int, tools: tuple[dict[str, Any], ...]
          ) -> tuple[dict[str, str] | None, str | None]:
    """One parsed call as {name, arguments (canonical JSON)}, checked against ``tools``."""
    where = f"tool call {n}"
    form = '(a call is {"name": ..., "arguments": {...}})'
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # the OpenAI form, {type: function, function: {...}}
    if not isinstance(value, dict):
        return None, (f"{where}: a JSON {_kind(value)}, not an object with name and "
                      "arguments")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None, f'{where}: no "name" {form}'
    where = f"{where} ({name})"
    # Llama 3 writes "parameters" where others write "arguments".
    args = value["arguments"] if "arguments" in value else value.get("parameters")
    if args is None:
        return None, f'{where}: no "arguments" {form}'
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return None, f"{where}: arguments: invalid JSON: {e.msg} at char {e.pos}"
    if not isinstance(args, dict):
        return None, f"{where}: arguments are a JSON {_kind(args)}, not an object"
    if tools:
        error = _check_against_tools(name, args, tools)
        if error is not None:
            return None, f"{where}: {error}"
    return {"name": name, "arguments": _canonical(args)}, None


def _check_against_tools(name: str, args: dict[str, Any],
                         tools: tuple[dict[str, Any], ...]) -> str | None:
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if name not in by_name:
        return f"unknown tool; the tools are {', '.join(sorted(by_name))}"
    params = by_name[name].get("parameters", {"type": "object", "properties": {}})
    found = first_schema_error(args, params)
    if found is None:
        return None
    return f"arguments do not match the tool's parameters: {found[0]}: {found[1]}"


def _kind(value: Any) -> str:
    """A decoded JSON value's type in JSON's words."""
    if isinstance(value, bool):
        return "boolean"
    kinds = {list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
