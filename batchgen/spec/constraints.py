"""Constraints (``generation.structured``) as llguidance grammars: checked at spec load, no torch.

Contract:

- ``check_spec`` runs at spec load, without the model's tokenizer. It raises ValueError naming
  the key.
- ``constraint_for`` turns a spec (and, for ``json_schema_column``, a row) into a hashable
  ``Constraint`` whose ``grammar`` text is llguidance's and doubles as the compile-cache key. A
  bad per-row schema raises ``ConstraintError`` naming the column; the worker makes that row an
  error.

The replica compiles constraints for its tokenizer and turns them into token masks
(``batchgen.engine.masks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# JSON is written as json.dumps writes it (", " and ": ") with no other whitespace: the shape
# models saw most, and flexible whitespace lets a weak model emit blanks until max_new_tokens. A
# schema can still opt in with "x-guidance": {"whitespace_flexible": true} (these are defaults).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
CACHE_SIZE = 1024  # compiled grammars per replica, and checked per-row schemas


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; message says what and where."""


@dataclass(frozen=True)
class Constraint:
    """``kind``: json_schema | json | regex | choice | grammar | tool_call. ``grammar``: llguidance's
    grammar text, the same string for the same constraint (the compile-cache key). JSON Schema
    key order is kept, not sorted: it is the order the properties are generated in."""

    kind: str
    grammar: str


def _one_line(message: str) -> str:
    """llguidance's multi-line message (with caret lines) as one line."""
    lines = [ln.strip() for ln in message.strip().splitlines()]
    return " ".join(ln for ln in lines if ln and set(ln) != {"^"})


def _schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _choice_lark(choices: tuple[str, ...]) -> str:
    # JSON string literals are Lark string literals in llguidance's dialect (its own "choice" form).
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _source(structured) -> tuple[str, str]:
    """(kind, text) of a spec-level constraint; text is what the grammar is built from."""
    if structured.json_schema is not None:
        return "json_schema", _schema_text(structured.json_schema)
    if structured.json_object:
        return "json", _schema_text(ANY_OBJECT)
    if structured.regex is not None:
        return "regex", structured.regex
    if structured.choice is not None:
        return "choice", _choice_lark(tuple(structured.choice))
    if structured.grammar is not None:
        return "grammar", structured.grammar
    raise ValueError("structured: no constraint given")


@lru_cache(maxsize=CACHE_SIZE)
def _compiled(kind: str, text: str, where: str) -> Constraint | str:
    """The checked constraint, or the error message (cached too: a bad schema repeats per row)."""
    from llguidance import LLMatcher

    if kind in ("json_schema", "json", "tool_call"):
        from batchgen.spec.schemas import schema_error

        problem = schema_error(json.loads(text))
        if problem:
            return f"{where}: not a valid JSON Schema: {problem}"
        try:
            grammar = LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except (TypeError, ValueError) as e:  # NaN bounds and the like, refused by llguidance
            return f"{where}: JSON Schema not supported for constrained decoding: {_one_line(str(e))}"
        what = "JSON Schema not supported for constrained decoding"
    elif kind == "regex":
        grammar, what = LLMatcher.grammar_from_regex(text), "invalid regular expression"
    elif kind == "choice":
        grammar, what = LLMatcher.grammar_from_lark(text), "cannot compile the choices"
    elif kind == "grammar":
        grammar, what = LLMatcher.grammar_from_lark(text), "invalid Lark grammar"
    else:
        raise ValueError(f"unknown constraint kind {kind!r}")
    error = LLMatcher.validate_grammar(grammar)
    if error:
        return f"{where}: {what}: {_one_line(error)}"
    return Constraint(kind, grammar)


def _checked(kind: str, text: str, where: str) -> Constraint:
    out = _compiled(kind, text, where)
    if isinstance(out, str):
        raise ConstraintError(out)
    return out


def check_spec(structured) -> None:
    """Raise ValueError naming the key (``regex: invalid regular expression: ...``) if the spec's
    constraint cannot be compiled. Per-row schemas and tools are checked elsewhere."""
    if structured.json_schema_column is not None or structured.tool_call:
        return
    kind, text = _source(structured)
    _checked(kind, text, kind)


def _dropped_nulls(value: Any) -> Any:
    # A struct column has every field of every row; the fields a row lacks come back as None.
    if isinstance(value, dict):
        return {k: _dropped_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_dropped_nulls(v) for v in value]
    return value


def _row_schema(column: str, row: dict | None) -> dict[str, Any]:
    where = f"column {column!r}"
    if row is None or column not in row:
        raise ConstraintError(f"{where}: missing from the row; it should hold the row's JSON Schema")
    value = row[column]
    if value is None:
        raise ConstraintError(f"{where}: null; expected the row's JSON Schema (JSON text or a "
                              "mapping)")
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"{where}: not JSON ({e}); expected the row's JSON Schema") from None
    else:
        value = _dropped_nulls(value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"{where}: not a valid JSON Schema: {e}") from None
    if not isinstance(value, dict):
        raise ConstraintError(f"{where}: not a valid JSON Schema: expected a mapping, got "
                              f"{type(value).__name__}")
    return value


def constraint_for(structured, tools=(), row: dict | None = None) -> Constraint | None:
    """The row's constraint (None without ``structured``). ``tools``: the OpenAI-form tools of
    ``input.tools``, for ``tool_call``. Raises ConstraintError naming the key or column."""
    if structured is None:
        return None
    if structured.json_schema_column is not None:
        column = structured.json_schema_column
        schema = _row_schema(column, row)
        return _checked("json_schema", _schema_text(schema), f"column {column!r}")
    if structured.tool_call:
        from batchgen.spec.tools import call_schema

        if not tools:
            raise ConstraintError("tool_call: needs input.tools")
        return _checked("tool_call", _schema_text(call_schema(tuple(tools))), "tool_call")
    kind, text = _source(structured)
    return _checked(kind, text, kind)


