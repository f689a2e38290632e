"""What happens to generations after decoding: exact-duplicate removal within a row's samples,
and JSON parsing with optional JSON Schema validation, time-bounded. Pure functions over plain
values."""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

_DECODER = json.JSONDecoder()


def first_json_object(text: str | None) -> tuple[str | None, str | None]:
    """(canonical JSON of the first JSON object in ``text``, None) or (None, why not)."""
    if text is None:
        return None, "no generation"
    start = text.find("{")
    last_error = "no JSON object in the text"
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as e:
            last_error = f"invalid JSON: {e.msg} at char {e.pos}"
        else:
            if isinstance(value, dict):
                return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")), None
        start = text.find("{", start + 1)
    return None, last_error


# A model's output checked against a JSON Schema runs the schema's regular expressions
# (`pattern`, `patternProperties`) over text the model chose. Python's re backtracks: a pattern
# such as ^(a|aa)*b$ against 56 a's runs for hours. Each check has this budget instead.
CHECK_SECONDS = 2.0
_DEADLINE: ContextVar[float | None] = ContextVar("batchgen_schema_deadline", default=None)


class _CheckTimeout(Exception):
    def __init__(self, pattern: str):
        super().__init__(pattern)
        self.pattern = pattern


class _BoundedRe:
    """The ``re`` of jsonschema's keyword code, which searches with it for ``pattern``,
    ``patternProperties`` and the ``additionalProperties`` and ``unevaluatedProperties`` that
    depend on them: inside ``first_schema_error`` a search runs on the ``regex`` engine,
    which can stop at the check's deadline; anywhere else it is ``re`` itself."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def search(pattern, string, flags=0):
        deadline = _DEADLINE.get()
        if deadline is None:
            return re.search(pattern, string, flags)
        import regex

        try:
            return regex.search(pattern, string, flags, timeout=max(deadline - time.monotonic(),
                                                                      1e-3))
        except TimeoutError:
            raise _CheckTimeout(pattern) from None


# jsonschema's modules that search with ``re`` (jsonschema >= 4.20; pyproject.toml's floor).
_KEYWORD_MODULES = ("jsonschema._keywords", "jsonschema._utils", "jsonschema._legacy_keywords")


@lru_cache(maxsize=1)
def _bound_jsonschema() -> None:
    """Give jsonschema's keyword code the bounded ``re``. A jsonschema whose code moved would
    leave the searches unbounded: that is refused loudly (every check, and a test, fails)."""
    import importlib

    for name in _KEYWORD_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "re", None), (type(re), _BoundedRe)):
            raise RuntimeError(f"{name} no longer searches with re: the schema check's time bound "
                               "(batchgen.shard.postprocess) needs updating for this jsonschema")
        module.re = _BoundedRe()


@lru_cache(maxsize=32)
def schema_validator(schema_json: str):
    """A validator for the JSON Schema in ``schema_json`` (canonical JSON text: the cache key)."""
    from jsonschema import validators

    _bound_jsonschema()
    schema = json.loads(schema_json)
    return validators.validator_for(schema)(schema)


def first_schema_error(value: Any, schema: dict[str, Any]) -> tuple[str, str] | None:
    """(where, message) of the first way ``value`` breaks ``schema``, or None; at most
    ``CHECK_SECONDS`` of regular-expression search, else the message says which pattern ran
    too long."""
    validator = schema_validator(json.dumps(schema, sort_keys=True))
    token = _DEADLINE.set(time.monotonic() + CHECK_SECONDS)
    try:
        problems = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    except _CheckTimeout as e:
        return "(check)", (f"stopped after {CHECK_SECONDS:g} s in the pattern {e.pattern!r}, which "
                           "backtracks on this text; write it so that it cannot (no nested or "
                           "overlapping repeats like (a|aa)*)")
    finally:
        _DEADLINE.reset(token)
    if not problems:
        return None
    return "/".join(str(p) for p in problems[0].path) or "(root)", problems[0].message


def parse_generation(text: str | None, schema: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(parsed, parse_error) for one generation: the first JSON object, checked against
    ``schema`` when one is given (``output.parse: json``)."""
    parsed, error = first_json_object(text)
    if parsed is None or schema is None:
        return parsed, error
    problem = schema_problem(json.loads(parsed), schema)
    return (None, problem) if problem else (parsed, None)


def parse_json(text: str, schema: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(parsed, parse_error) for a generation that is one JSON value as a whole (a JSON
    constraint's output: an object, or a string, array, number ... when its schema says so),
    as canonical JSON, checked against ``schema`` when one is given."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at char {e.pos}"
    problem = None if schema is None else schema_problem(value, schema)
    if problem:
        return None, problem
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")), None


def schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    """``schema: <where>: <message>`` of the first way ``value`` breaks ``schema``, or None."""
    found = first_schema_error(value, schema)
    return None if found is None else f"schema: {found[0]}: {found[1]}"


def duplicate_samples(row_ids: list[str], texts: list[str | None], failed: list[bool]) -> set[int]:
    """Indices of samples whose text repeats an earlier sample of the same row exactly. Error
    rows are never counted as duplicates."""
    seen: set[tuple[str, str]] = set()
    dupes: set[int] = set()
    for i, (row, text, bad) in enumerate(zip(row_ids, texts, failed)):
        if bad or text is None:
            continue
        if (row, text) in seen:
            dupes.add(i)
        else:
            seen.add((row, text))
    return dupes
