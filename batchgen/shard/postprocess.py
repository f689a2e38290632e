"""What happens to generations after decoding: exact-duplicate removal within a row's samples,
and JSON parsing with optional JSON Schema validation. Pure functions over plain values."""

from __future__ import annotations

import json
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


@lru_cache(maxsize=32)
def schema_validator(schema_json: str):
    """A validator for the JSON Schema in ``schema_json`` (canonical JSON text: the cache key)."""
    from jsonschema import validators

    schema = json.loads(schema_json)
    return validators.validator_for(schema)(schema)


def parse_generation(text: str | None, schema: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(parsed, parse_error) for one generation: the first JSON object, checked against
    ``schema`` when one is given."""
    parsed, error = first_json_object(text)
    if parsed is None or schema is None:
        return parsed, error
    problems = sorted(schema_validator(json.dumps(schema, sort_keys=True)).iter_errors(json.loads(parsed)),
                      key=lambda e: list(e.path))
    if problems:
        where = "/".join(str(p) for p in problems[0].path) or "(root)"
        return None, f"schema: {where}: {problems[0].message}"
    return parsed, None


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
