"""``output``: where results go, and how generations are parsed after decoding."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from batchgen.spec.base import _checked_path, _Section

# Columns every output row has, and those some jobs add (see the README's output layout);
# input.columns may not reuse the first group, nor those of the second that its job writes
# (``JobSpec.optional_columns``).
OUTPUT_COLUMNS = (
    "row_id", "sample_index", "prompt", "generation", "finish_reason",
    "prompt_tokens", "generated_tokens", "error", "seed",
    "parsed", "parse_error", "document_tokens", "chunks",
)


class OutputSpec(_Section):
    path: str = Field(description="Output directory, local or s3://; see the README's layout.")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        default="zstd", description="Parquet compression of the data files."
    )
    parse: Literal["none", "json"] = Field(
        default="none",
        description="'json': parse the first JSON object in each generation into the `parsed` "
        "column (canonical JSON text); rows that do not parse keep a `parse_error`, and are "
        "counted, not dropped.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON Schema that parsed objects must satisfy (needs parse: json); a "
        "violation is a parse_error.",
    )

    _path_is_usable = field_validator("path")(_checked_path)

    @model_validator(mode="after")
    def _schema_is_valid(self) -> OutputSpec:
        if self.json_schema is not None:
            if self.parse != "json":
                raise ValueError("json_schema needs parse: json")
            from batchgen.spec.schemas import schema_error

            problem = schema_error(self.json_schema)
            if problem:
                raise ValueError(f"json_schema is not a valid JSON Schema: {problem}")
        return self
