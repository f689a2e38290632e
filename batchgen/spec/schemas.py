"""JSON Schemas given in a spec (``output.json_schema``, ``generation.structured``, tool
parameters): is this a valid schema?"""

from __future__ import annotations

from typing import Any


def schema_error(schema: Any) -> str | None:
    """Why ``schema`` is not a valid JSON Schema (its metaschema's message), or None."""
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        return e.message
    return None
