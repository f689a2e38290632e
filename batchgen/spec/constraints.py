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

from batchgen.errors import one_line

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


# What regex-syntax (llguidance's regex parser) treats as syntax; everything else is literal.
_REGEX_SYNTAX = frozenset("\\.+*?()|[]{}^$#&-~")


def _choice_regex(choices: tuple[str, ...]) -> str:
    """The choices as one regular expression of literals. One lexeme, so any number of options
    works: as a Lark alternation of string literals, llguidance's parser holds one item per
    option and stops past 2000 of them (after the first token, so every row was cut to one
    character). Same language, so the same token masks (tests/engine/test_structured.py)."""
    return "|".join("".join("\\" + c if c in _REGEX_SYNTAX else c for c in choice)
                    for choice in choices)


def _source(structured) -> tuple[str, str]:
    """(kind, text) of a spec-level constraint; text is what the grammar is built from."""
    if structured.json_schema is not None:
        return "json_schema", _schema_text(structured.json_schema)
    if structured.json_object:
        return "json", _schema_text(ANY_OBJECT)
    if structured.regex is not None:
        return "regex", structured.regex
    if structured.choice is not None:
        return "choice", _choice_regex(tuple(structured.choice))
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
        grammar, what = LLMatcher.grammar_from_regex(text), "cannot compile the choices"
    elif kind == "grammar":
        grammar, what = LLMatcher.grammar_from_lark(text), "invalid Lark grammar"
    else:
        raise ValueError(f"unknown constraint kind {kind!r}")
    error = LLMatcher.validate_grammar(grammar)
    if error:
        return f"{where}: {what}: {_one_line(error)}"
    problem = _first_steps(grammar)
    if problem:
        return f"{where}: {problem}"
    return Constraint(kind, grammar)


class _Bytes:
    """A tokenizer of the 256 bytes and an end-of-sequence token: the finest one a model can
    have, for checking a grammar before the model's tokenizer is at hand."""

    eos_token_id, bos_token_id = 256, None
    tokens = [bytes([i]) for i in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)


@lru_cache(maxsize=1)
def _byte_tokenizer():
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_Bytes()), n_vocab=257)


def _allowed(matcher) -> list[int]:
    mask = matcher.compute_bitmask()
    return [t for t in range(257) if mask[t // 8] >> (t % 8) & 1]


def _first_steps(grammar: str) -> str | None:
    """Why generation under ``grammar`` cannot get going, found by walking its first byte with
    the byte tokenizer; None when it can. Catches what validating the grammar does not: a
    language with no text in it (a regex that matches nothing, ``{$ref: "#"}``) and llguidance's
    limits that bite from the first token (an alternation over 2000 options, a recursion whose
    every step is one short lexeme), which would otherwise end every row after a character."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    if matcher.is_error():  # it names a token the bytes lack: the replica's tokenizer decides
        return None
    allowed = _allowed(matcher)
    if matcher.is_error() or allowed == [256] and not matcher.is_accepting():
        return f"no text can satisfy it ({describe(matcher.get_error()) or 'nothing may start it'})"
    first = next((t for t in allowed if t != 256), None)
    if first is not None:
        matcher.consume_token(first)
        _allowed(matcher)
        if matcher.is_error():
            return f"llguidance cannot follow it: {describe(matcher.get_error())}"
    return None


def describe(error: str) -> str:
    """llguidance's error text (a matcher's ``get_error``) as one line for a user."""
    first = one_line(error)
    if first in ("NoExtension", "NoExtensionBias"):
        return f"llguidance: {first}, no token can continue the text"
    return first


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


