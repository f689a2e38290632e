"""Shard planning from Parquet footers alone, and the job fingerprint.

A plan is computed once, before any generation, and stored as ``<output>/plan.json``; a resumed
job reads it back and never re-plans, so shard ids and derived row ids stay stable. Shards are row
ranges inside one file: ``(shard_id, file, row_start, row_count)`` with zero-padded ids, plus the
shard's first global row index, from which row ids are derived when the input has no id column.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from fsspec.core import url_to_fs

from batchgen.engine.versions import ENGINE_VERSION
from batchgen.errors import InputError, SpecError
from batchgen.io import layout
from batchgen.io.storage import (
    JSONL_SUFFIXES, Storage, file_format, open_input, read_jsonl, read_rows, storage_options
)
from batchgen.shard import prompts
from batchgen.spec import InputSpec, JobSpec

PLAN_VERSION = 1
# 2: whole spec sections digested (minus keys that cannot change outputs), local inputs
# identified by content, local paths resolved. Plans without the field were written with 1.
# 3: the engine's version (``versions.ENGINE_VERSION``) is a part; plans of 1 and 2 were made by
# engine version 1.
FINGERPRINT_VERSION = 3
_GLOB_CHARS = set("*?[")

# Keys of output-changing sections that do not change any output row: where the model is cached,
# where outputs go, how files are compressed. Everything else in input, model, generation and
# output is digested, so a new key is covered by default.
NOT_OUTPUT_KEYS = {
    "input": {"path"},  # the files it names are digested one by one instead
    "model": {"cache_dir"},
    "output": {"path", "compression"},
}
# Keys added after fingerprint version 3, with the value that leaves outputs as they were: left
# out of the digest at that value, so a job that does not use them keeps its fingerprint (and
# resumes); digested like any other key once set.
LATER_KEYS = {
    "input": {"messages_column": None, "tools": [], "chat_template_kwargs": {},
              "completion_column": None},
    "generation": {"structured": None, "logprobs": None, "reasoning_end": None},
}


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    etag: str
    rows: int


@dataclass(frozen=True)
class Shard:
    shard_id: str
    file: str
    row_start: int
    row_count: int
    row_offset: int  # global index of the shard's first row across all input files


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


def output_storage(spec: JobSpec) -> Storage:
    return Storage(
        spec.output.path,
        storage_options(spec.output.path, spec.storage.endpoint_url, spec.storage.options),
    )


def input_options(spec: JobSpec) -> dict:
    return storage_options(spec.input.path, spec.storage.endpoint_url, spec.storage.options)


def make_plan(spec: JobSpec) -> Plan:
    """List the input, read every file's footer (no row data), check columns, cut shards."""
    check_output_outside_input(spec)
    options = input_options(spec)
    listed = list_input_files(spec.input.path, options, spec.input.format)
    needed = prompts.job_columns(spec)

    def footer(entry: tuple[str, int, str]) -> InputFile:
        url, size, etag = entry
        return InputFile(url, size, etag, _footer_rows(url, options, needed, spec.input))

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
    return Plan(_digest(parts), parts, files, shards)


def current_fingerprint(spec: JobSpec, version: int = FINGERPRINT_VERSION,
                        as_given: JobSpec | None = None) -> tuple[str, dict[str, str]]:
    """The job's fingerprint as its input stands now, from one listing (and, for local
    Parquet files, one footer read each): what a resume compares with the stored plan,
    without re-planning. ``version`` 1 reproduces what earlier batchgen versions stored, from
    the spec as the user spelled it (``as_given``), so their jobs still resume."""
    prompts.needed_columns(spec.input)  # the template is still checked before any work
    if version == 1:
        legacy = as_given or spec
        listed = list_input_files(legacy.input.path, input_options(legacy), legacy.input.format,
                                  by_content=False)
        parts = _legacy_parts(legacy, tuple(InputFile(u, size, etag, 0) for u, size, etag in listed))
    else:
        listed = list_input_files(spec.input.path, input_options(spec), spec.input.format)
        parts = fingerprint_parts(spec, tuple(InputFile(u, size, etag, 0) for u, size, etag in listed))
        if version == 2:  # before the engine's version was a part
            del parts["engine"]
    return _digest(parts), parts


def fingerprint_parts(spec: JobSpec, files: tuple[InputFile, ...]) -> dict[str, str]:
    """One digest per thing that changes outputs, so a mismatch can say which changed."""
    def section(name: str) -> dict[str, Any]:
        doc = getattr(spec, name).model_dump(mode="json")
        later = LATER_KEYS.get(name, {})
        return {k: v for k, v in doc.items() if k not in NOT_OUTPUT_KEYS.get(name, ())
                and not (k in later and v == later[k])}

    return {
        "input": _digest([(f.url, f.size, f.etag) for f in files]),
        "model": _digest(section("model")),
        "prompt": _digest(section("input")),
        "generation": _digest(section("generation") | (
            {"mode": spec.mode} if spec.mode != "generate" else {})),
        "output": _digest(section("output")),
        "engine": engine_part(spec),
    }


def engine_part(spec: JobSpec) -> str:
    """The engine's version, and with generation.structured the grammar engine's: another
    llguidance may mask differently, so constrained text from two of them is never mixed."""
    if spec.generation.structured is None:
        return str(ENGINE_VERSION)
    from importlib.metadata import version

    return f"{ENGINE_VERSION}+llguidance-{version('llguidance')}"


def _legacy_parts(spec: JobSpec, files: tuple[InputFile, ...]) -> dict[str, str]:
    """Fingerprint version 1, as batchgen wrote it before version 2 (kept to resume old jobs)."""
    m, g, i = spec.model, spec.generation, spec.input
    return {
        "input": _digest([(f.url, f.size, f.etag) for f in files]),
        "model": _digest([m.path, m.revision, m.dtype, m.max_input_tokens, m.truncation]
                         + ([m.engine] if m.engine != "transformers" else [])),
        "prompt": _digest(
            [i.prompt_column, i.template, i.chat, i.system_prompt, i.id_column, list(i.columns)]
        ),
        "generation": _digest(g.model_dump(mode="json")),
    }


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
    if set(inp) & _GLOB_CHARS:
        listed = re.fullmatch(_glob_regex(inp), f"{out}/{layout.data_path('000000')}") is not None
    else:  # a directory is listed recursively, skipping _hidden and .hidden folders
        inside = (out + "/").startswith(inp + "/")
        listed = inside and not _hidden(posixpath.relpath(out, inp) if out != inp else "")
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


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def list_input_files(path: str, options: dict, fmt: str = "auto", *,
                     by_content: bool = True) -> list[tuple[str, int, str]]:
    """``(url, size, identity)`` of every input file the input path names, sorted by URL. The
    identity is the ETag on object stores; a local file's modification time says nothing about
    its content (a fresh checkout, a ``cp``, a ``touch``), so local files are identified by
    content: a digest of the Parquet footer, or of the whole file for JSON Lines.

    Directories are searched recursively; files and folders whose names start with ``_`` or
    ``.`` are skipped (the Hive/Spark convention), so the output folder of an earlier batchgen
    job can be an input without its staging files.
    """
    try:
        fs, root = url_to_fs(path, **options)
        if set(root) & _GLOB_CHARS:
            infos = [i for i in fs.glob(root, detail=True).values() if i["type"] != "directory"]
            if not infos:
                raise InputError(f"input.path {path}: the glob matches no files")
        elif fs.isdir(root):
            # (Not *.json by default: a batchgen output holds job.json, plan.json...)
            suffixes = {"parquet": (".parquet",), "jsonl": JSONL_SUFFIXES}.get(
                fmt, (".parquet", ".jsonl", ".ndjson"))
            infos = [
                i
                for p, i in fs.find(root, detail=True).items()
                if p.lower().endswith(suffixes) and not _hidden(posixpath.relpath(p, root))
            ]
            if not infos:
                raise InputError(
                    f"input.path {path}: the directory holds no {'/'.join('*' + x for x in suffixes)} files")
        elif fs.isfile(root):
            infos = [fs.info(root)]
        else:
            raise InputError(f"input.path {path}: no such file or directory")
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"input.path {path}: cannot list it: {e}") from None
    odd = [i["name"] for i in infos if i.get("type") not in ("file", None)]
    if odd:  # a FIFO or device would block the footer read forever
        raise InputError(f"input.path {path}: {odd[0]} is not a regular file; remove it or "
                         "name the input files with a glob")
    local = not ("://" in path and not path.startswith("file://"))
    result = []
    for info in infos:
        url = fs.unstrip_protocol(info["name"]) if "://" in path else info["name"]
        if local and by_content:
            etag = _content_identity(info["name"], int(info.get("size") or 0), file_format(url, fmt))
        else:
            etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        result.append((url, int(info.get("size") or 0), etag.strip('"')))
    return sorted(result)


def _content_identity(path: str, size: int, fmt: str) -> str:
    """A digest of what a local file holds: the Parquet footer (schema, row groups, their
    offsets and statistics; read with one seek) or a whole JSON Lines file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if fmt == "parquet" and size >= 12:
                f.seek(size - 8)
                tail = f.read(8)
                footer_len = int.from_bytes(tail[:4], "little")
                if tail[4:] == b"PAR1" and footer_len + 8 <= size:
                    f.seek(size - 8 - footer_len)
                    digest.update(f.read(footer_len))
                    return f"footer:{digest.hexdigest()[:32]}"
                f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror or e}") from None
    return f"sha256:{digest.hexdigest()[:32]}"


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _footer_rows(url: str, options: dict, needed: list[str], inp: InputSpec) -> int:
    """Row count and a check of the columns the spec names and their types: from the footer
    for Parquet; a JSON Lines file has no footer, so it is read (seed datasets are small)."""
    import pyarrow.parquet as pq

    if file_format(url, inp.format) == "jsonl":
        try:
            table = read_jsonl(url, options)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{url}: not a readable JSON Lines file (one object per line): "
                             f"{str(e).splitlines()[0]}") from None
        schema, rows = table.schema, table.num_rows
    else:
        try:
            with open_input(url, options) as f:
                pf = pq.ParquetFile(f)
                schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise InputError(f"{url}: not a readable Parquet file: {e}") from None
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
