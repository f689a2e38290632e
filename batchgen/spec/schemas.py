"""JSON Schemas given in a spec (``output.json_schema``, ``generation.structured``, tool
parameters) or in a row (``json_schema_column``): is this a valid schema?"""

from __future__ import annotations

import math
from typing import Any


def schema_error(schema: Any) -> str | None:
    """Why ``schema`` is not a valid JSON Schema, or None: a number JSON cannot hold (NaN and
    infinities, which YAML's ``.nan`` and Python's JSON reader let in), else its metaschema's
    message."""
    from jsonschema import SchemaError, validators

    odd = _non_finite(schema, "")
    if odd is not None:
        where, value = odd
        return (f"{where or '(root)'}: {value} is not a number JSON can hold (JSON has no NaN "
                "or Infinity)")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        return e.message
    return None


def _non_finite(value: Any, where: str) -> tuple[str, str] | None:
    """(path, 'NaN'/'Infinity'/'-Infinity') of the first non-finite number in ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None
