"""Shard planning from Parquet footers alone.

A plan is computed once, before any generation, and stored as ``<output>/plan.json``; a resumed
job reads it back and never re-plans, so shard ids and derived row ids stay stable. Shards are row
ranges inside one file: ``(shard_id, file, row_start, row_count)`` with zero-padded ids, plus the
shard's first global row index, from which row ids are derived when the input has no id column.
The plan carries the job's fingerprint (``fingerprint``).
"""

from __future__ import annotations

import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from batchgen.errors import InputError, SpecError
from batchgen.io import layout
from batchgen.io.inputs import (
    GLOB_CHARS, InputFile, Shard, hidden, list_input_files, read_rows, read_schema
)
from batchgen.io.storage import input_options
from batchgen.job.fingerprint import FINGERPRINT_VERSION, digest, fingerprint_parts
from batchgen.shard import prompts
from batchgen.spec import InputSpec, JobSpec

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    fingerprint_parts: dict[str, str]
    files: tuple[InputFile, ...]
    shards: tuple[Shard, ...]
    fingerprint_version: int = FINGERPRINT_VERSION

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_parts": self.fingerprint_parts,
            "fingerprint_version": self.fingerprint_version,
            "files": [asdict(f) for f in self.files],
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise InputError(f"plan.json: unsupported plan version {data.get('version')!r}")
        return cls(
            fingerprint=data["fingerprint"],
            fingerprint_parts=dict(data["fingerprint_parts"]),
            files=tuple(InputFile(**f) for f in data["files"]),
            shards=tuple(Shard(**s) for s in data["shards"]),
            fingerprint_version=int(data.get("fingerprint_version", 1)),
        )


def make_plan(spec: JobSpec) -> Plan:
    """List the input, read every file's footer (no row data), check columns, cut shards."""
    check_output_outside_input(spec)
    options = input_options(spec)
    listed = list_input_files(spec.input.path, options, spec.input.format)
    needed = prompts.job_columns(spec)

    def footer(entry: tuple[str, int, str]) -> InputFile:
        url, size, etag = entry
        return InputFile(url, size, etag, _checked_rows(url, options, needed, spec.input))

    with ThreadPoolExecutor(max_workers=16) as pool:
        files = tuple(pool.map(footer, listed))

    ranges = []
    offset = 0
    for f in files:
        for start in range(0, f.rows, spec.resources.shard_rows):
            count = min(spec.resources.shard_rows, f.rows - start)
            ranges.append((f.url, start, count, offset + start))
        offset += f.rows
    width = max(6, len(str(len(ranges))))
    shards = tuple(
        Shard(str(i).zfill(width), url, start, count, row_offset)
        for i, (url, start, count, row_offset) in enumerate(ranges)
    )
    parts = fingerprint_parts(spec, files)
    return Plan(digest(parts), parts, files, shards)


def resolve_local_paths(spec: JobSpec) -> JobSpec:
    """The spec with local input, output and model paths made absolute, once, when a job
    starts: stored that way in job.json, a job means the same from any directory (``batchgen
    resume OUTPUT``, ``batchgen submit``), and the fingerprint sees what is read, not how its
    path was spelled."""
    def absolute(path: str) -> str:
        return path if "://" in path else os.path.abspath(os.path.expanduser(path))

    model = spec.model
    if model.engine != "echo" and "://" not in model.path and os.path.isdir(
            os.path.expanduser(model.path)):
        model = model.model_copy(update={"path": absolute(model.path)})
    return spec.model_copy(update={
        "input": spec.input.model_copy(update={"path": absolute(spec.input.path)}),
        "output": spec.output.model_copy(update={"path": absolute(spec.output.path)}),
        "model": model,
    })


def check_output_outside_input(spec: JobSpec) -> None:
    """An output whose files the input path would list reads its own outputs as inputs on the
    next run (and then refuses to resume: "changed: input"). Checked when a job is planned."""
    resolved = resolve_local_paths(spec)
    inp, out = resolved.input.path.rstrip("/"), resolved.output.path.rstrip("/")
    if set(inp) & GLOB_CHARS:
        listed = re.fullmatch(_glob_regex(inp), f"{out}/{layout.data_path('000000')}") is not None
    else:  # a directory is listed recursively, skipping _hidden and .hidden folders
        inside = (out + "/").startswith(inp + "/")
        listed = inside and not hidden(posixpath.relpath(out, inp) if out != inp else "")
    if listed:
        raise SpecError(f"output.path {spec.output.path} is inside input.path {spec.input.path}: "
                        "its outputs would become inputs of the next run; write the output "
                        "elsewhere (or in a folder whose name starts with _)")


def _glob_regex(pattern: str) -> str:
    """A glob as fsspec matches it: ``*`` and ``?`` stay inside one folder, ``**`` crosses them."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return "".join(parts)


def _checked_rows(url: str, options: dict, needed: list[str], inp: InputSpec) -> int:
    """Row count of one input file, after a check of the columns the spec names and their
    types, from the footer (Parquet) or the file (JSON Lines)."""
    schema, rows = read_schema(url, options, inp.format)
    names = set(schema.names)
    missing = [c for c in needed if c not in names]
    if missing:
        raise SpecError(
            f"{url}: column(s) {', '.join(missing)} named by the spec (input.prompt_column, "
            f"input.template, input.messages_column, input.completion_column, input.id_column, "
            f"input.columns or generation.structured.json_schema_column) are not in the file; it has: "
            f"{', '.join(sorted(names))}"
        )
    prompts.check_column_types(inp, schema, url)
    return rows


def check_unique_ids(spec: JobSpec, plan: Plan) -> None:
    """With ``input.id_column``, every id must be non-null and unique across the whole input,
    or output rows could not be keyed by (row_id, sample_index). Reads only that column, once,
    when a job is first planned."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = spec.input.id_column
    if column is None:
        return
    options = input_options(spec)

    def ids(f: InputFile):
        values = read_rows(f.url, 0, f.rows, [column], options, spec.input.format).column(column)
        return f.url, values.cast(pa.string())

    with ThreadPoolExecutor(max_workers=8) as pool:
        per_file = list(pool.map(ids, plan.files))
    for url, values in per_file:
        nulls = values.null_count
        if nulls:
            first = pc.index(pc.is_null(values), True).as_py()
            raise InputError(
                f"{url}: input.id_column {column!r} is null in {nulls} row(s), the first at row "
                f"{first}; every row needs an id"
            )
    if not per_file:
        return
    everything = pa.chunked_array([v for _, v in per_file], pa.string())
    counts = pc.value_counts(everything)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        shown = ", ".join(repr(v) for v in dupes.field("values").to_pylist()[:5])
        where = ", ".join(url for url, v in per_file if pc.any(pc.is_in(v, dupes.field("values"))).as_py())
        raise InputError(
            f"input.id_column {column!r} has {len(dupes)} duplicate value(s) ({shown}) in "
            f"{where}; ids must be unique across the input"
        )
