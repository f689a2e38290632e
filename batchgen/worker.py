"""One shard, end to end, on one model replica. No Ray: the driver wraps this in an actor.

read rows → render prompts → tokenize and fit → engine → assemble and verify → write a local
Parquet file → check it → upload it whole to staging. A row that cannot be processed becomes an
error row (``finish_reason: error``); the shard goes on. Only the driver commits.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen import prompts
from batchgen.engine import Engine, PromptTooLong, Request
from batchgen.errors import ShardError
from batchgen.plan import Plan, Shard, input_options
from batchgen.spec import JobSpec
from batchgen.storage import Storage, read_rows, storage_options

OUTPUT_FIELDS = [
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("generation", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("generated_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("seed", pa.int64(), nullable=False),
]


@dataclass
class ShardResult:
    shard_id: str
    attempt: str
    staged: str  # path of the staged file, relative to the output root
    rows: int  # input rows
    outputs: int  # output rows: rows x n
    errors: int  # output rows with finish_reason "error"
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    host: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_storage(spec: JobSpec) -> Storage:
    return Storage(
        spec.output.path,
        storage_options(spec.output.path, spec.storage.endpoint_url, spec.storage.options),
    )


def staged_path(shard_id: str, attempt: str) -> str:
    return f"_batchgen/staging/{shard_id}/{attempt}.parquet"


def row_seed(job_seed: int, row_id: str, sample_index: int) -> int:
    """A 63-bit seed from (job seed, row id, sample index): the same wherever the row runs."""
    digest = hashlib.sha256(f"{job_seed}\x1f{row_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ShardWorker:
    def __init__(self, spec: JobSpec, engine: Engine | None = None):
        self.spec = spec
        self.engine = engine or Engine.load(spec.model, spec.generation, spec.resources)
        self.output = output_storage(spec)
        self.in_options = input_options(spec)
        self.columns = prompts.needed_columns(spec.input)

    def run(self, shard: Shard, attempt: str | None = None, redo_errors: str | None = None) -> ShardResult:
        """Generate the shard and stage it. With ``redo_errors`` (the committed file of this
        shard, relative to the output), only its ``finish_reason: error`` rows are generated
        again; every other row is copied unchanged."""
        started = time.perf_counter()
        attempt = attempt or uuid.uuid4().hex[:12]

        # 1. Read this shard's rows, and only the columns the spec needs.
        table = read_rows(shard.file, shard.row_start, shard.row_count, self.columns, self.in_options)
        if table.num_rows != shard.row_count:
            raise ShardError(
                f"shard {shard.shard_id}: {shard.file} rows {shard.row_start}+{shard.row_count} "
                f"gave {table.num_rows} rows; the input changed since it was planned"
            )
        rows, bad = _rows(table)
        row_ids = self._row_ids(shard, rows)

        if redo_errors is None:
            result = self._generate(table, rows, bad, row_ids, range(len(rows)))
        else:
            result = self._redo_errors(shard, redo_errors, table, rows, bad, row_ids)
        _verify_one_to_one(shard, row_ids, self.spec.generation.n, result)

        # 6. Write locally, check the footer, upload whole to staging.
        rel = staged_path(shard.shard_id, attempt)
        self._write_staged(result, rel)
        reasons = result.column("finish_reason").to_pylist()
        return ShardResult(
            shard_id=shard.shard_id,
            attempt=attempt,
            staged=rel,
            rows=len(rows),
            outputs=result.num_rows,
            errors=reasons.count("error"),
            prompt_tokens=sum(result.column("prompt_tokens").to_pylist()),
            generated_tokens=sum(result.column("generated_tokens").to_pylist()),
            seconds=time.perf_counter() - started,
            host=socket.gethostname(),
        )

    def _generate(self, table, rows, bad, row_ids, which) -> pa.Table:
        """Output rows for the input rows at indices ``which``: one per (row, sample index)."""
        spec, n = self.spec, self.spec.generation.n
        which = list(which)

        # 2. Prompts, per row; a row that fails keeps its error and the shard goes on.
        texts, errors = render_prompts(spec, [rows[i] for i in which], {
            k: bad[i] for k, i in enumerate(which) if i in bad}, self.engine.tokenizer)

        # 3. Tokenize once per row, fit to the context; samples share the tokens.
        valid = [k for k in range(len(which)) if errors[k] is None]
        token_ids: dict[int, tuple[int, ...]] = {}
        for k, ids in zip(valid, self.engine.tokenize([texts[k] for k in valid], chat=spec.input.chat)):
            try:
                token_ids[k] = self.engine.fit(ids)
            except PromptTooLong as e:
                errors[k] = str(e)

        # 4. Generate every (row, sample) that has a prompt.
        seeds = {(k, s): row_seed(spec.generation.seed, row_ids[i], s)
                 for k, i in enumerate(which) for s in range(n)}
        keys = [(k, s) for k in sorted(token_ids) for s in range(n)]
        completions = dict(
            zip(keys, self.engine.generate([Request(token_ids[k], seeds[(k, s)]) for k, s in keys]))
        )

        # 5. Assemble exactly one output row per (input row, sample index).
        out: dict[str, list] = {f.name: [] for f in OUTPUT_FIELDS}
        take: list[int] = []
        for k, i in enumerate(which):
            for s in range(n):
                c = completions.get((k, s))
                failed = c is None or c.finish_reason == "error"
                take.append(i)
                out["row_id"].append(row_ids[i])
                out["sample_index"].append(s)
                out["prompt"].append(texts[k])
                out["generation"].append(None if failed else c.text)
                out["finish_reason"].append("error" if failed else c.finish_reason)
                out["prompt_tokens"].append(len(token_ids[k]) if k in token_ids else 0)
                out["generated_tokens"].append(0 if failed else c.generated_tokens)
                out["error"].append((c.error if c is not None else errors[k]) if failed else None)
                out["seed"].append(seeds[(k, s)])
        return _with_input_columns(table, spec.input.columns, take, out)

    def _redo_errors(self, shard, committed_rel, table, rows, bad, row_ids) -> pa.Table:
        with self.output.open_read(committed_rel) as f:
            committed = pq.ParquetFile(f).read()
        keys = list(zip(committed.column("row_id").to_pylist(),
                        committed.column("sample_index").to_pylist()))
        reasons = committed.column("finish_reason").to_pylist()
        redo_keys = {key for key, r in zip(keys, reasons) if r == "error"}
        redo_rows = {r for r, _ in redo_keys}
        which = [i for i, r in enumerate(row_ids) if r in redo_rows]
        fresh = self._generate(table, rows, bad, row_ids, which).cast(committed.schema)
        position = {key: j for j, key in enumerate(zip(fresh.column("row_id").to_pylist(),
                                                      fresh.column("sample_index").to_pylist()))}
        # Committed rows in their order, each error row swapped for its new version.
        take = [committed.num_rows + position[key] if key in redo_keys else j
                for j, key in enumerate(keys)]
        both = pa.concat_tables([committed, fresh])
        return both.take(pa.array(take, pa.int64()))

    def _row_ids(self, shard: Shard, rows: list[dict[str, Any]]) -> list[str]:
        id_col = self.spec.input.id_column
        if id_col is None:
            return [str(shard.row_offset + i) for i in range(len(rows))]
        ids = []
        for i, row in enumerate(rows):
            value = row.get(id_col)
            if value is None:
                raise ShardError(
                    f"{shard.file}: row {shard.row_start + i}: input.id_column {id_col!r} is null; "
                    "every row needs an id"
                )
            ids.append(str(value))
        if len(set(ids)) != len(ids):
            dupes = sorted(x for x, k in Counter(ids).items() if k > 1)[:5]
            raise ShardError(
                f"{shard.file}: input.id_column {id_col!r} has duplicate values "
                f"({', '.join(dupes)}); ids must be unique"
            )
        return ids

    def _write_staged(self, table: pa.Table, rel: str) -> None:
        compression = self.spec.output.compression
        fd, local = tempfile.mkstemp(suffix=".parquet", prefix="batchgen-")
        os.close(fd)
        try:
            pq.write_table(table, local, compression=None if compression == "none" else compression)
            written = pq.ParquetFile(local).metadata.num_rows
            if written != table.num_rows:
                raise ShardError(f"{rel}: wrote {written} rows, expected {table.num_rows}")
            self.output.upload(local, rel)
        finally:
            os.unlink(local)


def _rows(table: pa.Table) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Row dicts, plus the rows whose text cannot be decoded (pyarrow reads invalid UTF-8 in a
    string column without complaint; converting it to Python raises)."""
    columns: dict[str, list] = {}
    bad: dict[int, str] = {}
    for name in table.column_names:
        col = table.column(name)
        try:
            columns[name] = col.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            values = []
            for i, raw in enumerate(col.cast(pa.binary()).to_pylist()):
                try:
                    values.append(None if raw is None else raw.decode("utf-8"))
                except UnicodeDecodeError:
                    values.append(None)
                    bad.setdefault(i, f"column {name!r} holds invalid UTF-8")
            columns[name] = values
    rows = [{k: v[i] for k, v in columns.items()} for i in range(table.num_rows)]
    return rows, bad


def _with_input_columns(table: pa.Table, keep: tuple[str, ...], take: list[int], out: dict) -> pa.Table:
    indices = pa.array(take, pa.int64())
    arrays = [table.column(c).take(indices) for c in keep if c not in out]
    fields = [table.schema.field(c) for c in keep if c not in out]
    arrays += [pa.array(out[f.name], f.type) for f in OUTPUT_FIELDS]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields + OUTPUT_FIELDS))


def _verify_one_to_one(shard: Shard, row_ids: list[str], n: int, table: pa.Table) -> None:
    expected = {(r, s) for r in row_ids for s in range(n)}
    got = list(zip(table.column("row_id").to_pylist(), table.column("sample_index").to_pylist()))
    if len(got) != len(expected) or set(got) != expected:
        raise ShardError(
            f"shard {shard.shard_id}: output rows do not match input rows one-to-one "
            f"({len(got)} rows for {len(expected)} (row, sample) pairs)"
        )


def render_prompts(
    spec: JobSpec, rows: list[dict[str, Any]], bad: dict[int, str], tokenizer: Any
) -> tuple[list[str | None], list[str | None]]:
    """(prompt text or None, error or None) per row, after the chat template if asked for."""
    texts: list[str | None] = [None] * len(rows)
    errors: list[str | None] = [bad.get(i) for i in range(len(rows))]
    for i, row in enumerate(rows):
        if errors[i] is not None:
            continue
        try:
            text = prompts.render(spec.input, row)
        except prompts.RowError as e:
            errors[i] = str(e)
            continue
        if spec.input.chat:
            text = tokenizer.apply_chat_template(
                prompts.chat_messages(spec.input, text), tokenize=False, add_generation_prompt=True
            )
        texts[i] = text
    return texts, errors


def estimate_prompt_tokens(spec: JobSpec, plan: Plan, sample: int = 256) -> float:
    """Mean prompt tokens per row over the first rows of the input; loads only the tokenizer."""
    from batchgen.engine import load_tokenizer

    if not plan.shards:
        return 0.0
    tokenizer = load_tokenizer(spec.model)
    first = plan.shards[0]
    table = read_rows(first.file, first.row_start, min(sample, first.row_count),
                      prompts.needed_columns(spec.input), input_options(spec))
    texts = [t for t in render_prompts(spec, *_rows(table), tokenizer)[0] if t is not None]
    if not texts:
        return 0.0
    ids = tokenizer(texts, add_special_tokens=not spec.input.chat)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)
