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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen import postprocess, prompts
from batchgen.engine import Engine, PromptTooLong, Request, load_engine
from batchgen.modelcache import local_model
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
PARSE_FIELDS = [pa.field("parsed", pa.string()), pa.field("parse_error", pa.string())]
CHUNK_FIELDS = [pa.field("document_tokens", pa.int32()), pa.field("chunks", pa.int32())]
CHUNKS_SCHEMA = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("chunk_tokens", pa.int32(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("generation", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("generated_tokens", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("seed", pa.int64(), nullable=False),
])


def output_fields(spec: JobSpec) -> list[pa.Field]:
    """The columns batchgen adds to every output row of this job."""
    fields = list(OUTPUT_FIELDS)
    if spec.output.parse == "json":
        fields += PARSE_FIELDS
    if spec.input.long_documents == "chunk":
        fields += CHUNK_FIELDS
    return fields


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
    parsed: int = 0  # rows whose generation parsed (output.parse: json)
    parse_errors: int = 0
    duplicates_removed: int = 0  # samples dropped by generation.dedupe
    chunked_rows: int = 0  # rows summarized window by window (long_documents: chunk)
    chunks: int = 0  # windows summarized
    staged_chunks: str | None = None  # the window summaries, staged beside the data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_storage(spec: JobSpec) -> Storage:
    return Storage(
        spec.output.path,
        storage_options(spec.output.path, spec.storage.endpoint_url, spec.storage.options),
    )


def staged_path(shard_id: str, attempt: str, kind: str = "data") -> str:
    suffix = "" if kind == "data" else f".{kind}"
    return f"_batchgen/staging/{shard_id}/{attempt}{suffix}.parquet"


def row_seed(job_seed: int, row_id: str, sample_index: int) -> int:
    """A 63-bit seed from (job seed, row id, sample index): the same wherever the row runs."""
    digest = hashlib.sha256(f"{job_seed}\x1f{row_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ShardWorker:
    def __init__(self, spec: JobSpec, engine: Engine | None = None):
        self.spec = spec
        if engine is None:
            model, _ = local_model(spec)
            engine = load_engine(model, spec.generation, spec.resources)
        self.engine = engine
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
        table = read_rows(shard.file, shard.row_start, shard.row_count, self.columns,
                          self.in_options, self.spec.input.format)
        if table.num_rows != shard.row_count:
            raise ShardError(
                f"shard {shard.shard_id}: {shard.file} rows {shard.row_start}+{shard.row_count} "
                f"gave {table.num_rows} rows; the input changed since it was planned"
            )
        rows, bad = _rows(table)
        row_ids = self._row_ids(shard, rows)

        if redo_errors is None:
            result, chunks = self._generate(table, rows, bad, row_ids, range(len(rows)))
        else:
            result, chunks = self._redo_errors(shard, redo_errors, table, rows, bad, row_ids)
        _verify_one_to_one(shard, row_ids, self.spec.generation.n, result,
                           partial=self.spec.generation.dedupe)

        # 6. Write locally, check the footer, upload whole to staging (window summaries first:
        # the driver publishes them before the data, so data never points at missing chunks).
        rel = staged_path(shard.shard_id, attempt)
        chunks_rel = None
        if chunks is not None:
            chunks_rel = staged_path(shard.shard_id, attempt, "chunks")
            self._write_staged(chunks, chunks_rel)
        self._write_staged(result, rel)
        reasons = result.column("finish_reason").to_pylist()
        n_out = result.num_rows
        counts = {}
        if "parse_error" in result.column_names:
            parsed = result.column("parse_error").null_count
            counts["parsed"] = parsed
            counts["parse_errors"] = n_out - parsed
        if "chunks" in result.column_names:
            per_row = result.column("chunks").to_pylist()
            counts["chunked_rows"] = sum(1 for c in per_row if c)
            counts["chunks"] = sum(per_row)
        return ShardResult(
            shard_id=shard.shard_id,
            attempt=attempt,
            staged=rel,
            rows=len(rows),
            outputs=n_out,
            errors=reasons.count("error"),
            prompt_tokens=sum(result.column("prompt_tokens").to_pylist()),
            generated_tokens=sum(result.column("generated_tokens").to_pylist()),
            seconds=time.perf_counter() - started,
            host=socket.gethostname(),
            duplicates_removed=len(rows) * self.spec.generation.n - n_out,
            staged_chunks=chunks_rel,
            **counts,
        )

    def _generate(self, table, rows, bad, row_ids, which) -> tuple[pa.Table, pa.Table | None]:
        """Output rows for the input rows at indices ``which``: one per (row, sample index),
        and, when documents are chunked, one row per window summary."""
        spec, n, engine = self.spec, self.spec.generation.n, self.engine
        which = list(which)
        sub_rows = [rows[i] for i in which]
        chunking = spec.input.long_documents == "chunk"

        # 2. Prompts, per row; a row that fails keeps its error and the shard goes on.
        texts, errors = render_prompts(spec, sub_rows, {
            k: bad[i] for k, i in enumerate(which) if i in bad}, engine.tokenizer)

        # 3. Tokenize once per row, fit to the context; samples share the tokens. With chunking,
        # a row too long for the budget is summarized window by window instead.
        valid = [k for k in range(len(which)) if errors[k] is None]
        token_ids: dict[int, tuple[int, ...]] = {}
        long_rows: list[int] = []
        budget = engine.max_input_tokens
        for k, ids in zip(valid, engine.tokenize([texts[k] for k in valid], chat=spec.input.chat)):
            if chunking and budget is not None and len(ids) > budget:
                long_rows.append(k)
                continue
            try:
                token_ids[k] = engine.fit(ids)
            except PromptTooLong as e:
                errors[k] = str(e)

        # 4. Generate every (row, sample) that has a prompt, and every window of a long row.
        seeds = {(k, s): row_seed(spec.generation.seed, row_ids[i], s)
                 for k, i in enumerate(which) for s in range(n)}
        keys = [(k, s) for k in sorted(token_ids) for s in range(n)]
        requests = [Request(token_ids[k], seeds[(k, s)]) for k, s in keys]
        windows = chunk_windows(spec, engine, sub_rows, [row_ids[i] for i in which], long_rows,
                                errors)
        completions = engine.generate(requests + [w.request for w in windows])
        done = dict(zip(keys, completions))
        for w, c in zip(windows, completions[len(keys):]):
            w.completion = c
        document_tokens: dict[int, int] = {}
        n_chunks: dict[int, int] = {}
        if chunking:
            for k, i in enumerate(which):
                doc = sub_rows[k].get(spec.input.chunk_column)
                document_tokens[k] = len(engine.tokenize([doc])[0]) if isinstance(doc, str) else 0
            # 4b. Reduce: one prompt per long row over its window summaries, in order.
            reduce_keys, reduce_requests = [], []
            for k in long_rows:
                if errors[k] is not None:  # its document could not be split
                    continue
                parts = [w for w in windows if w.k == k]
                n_chunks[k] = len(parts)
                failed = [w for w in parts if w.completion.finish_reason == "error"]
                if failed:
                    errors[k] = f"window {failed[0].index}: {failed[0].completion.error}"
                    continue
                try:
                    text = prompts.render(spec.input, {**sub_rows[k], "summaries": [
                        w.completion.text for w in parts]}, spec.input.reduce_template,
                        "input.reduce_template")
                    text = wrap_prompt(spec, text, engine.tokenizer)
                    token_ids[k] = engine.fit(engine.tokenize([text], chat=spec.input.chat)[0])
                except (prompts.RowError, PromptTooLong) as e:
                    errors[k] = f"reduce: {e}"
                    continue
                texts[k] = text
                reduce_keys.append((k, 0))
                reduce_requests.append(Request(token_ids[k], seeds[(k, 0)]))
            done.update(zip(reduce_keys, engine.generate(reduce_requests)))

        # 5. Assemble exactly one output row per (input row, sample index).
        fields = output_fields(spec)
        out: dict[str, list] = {f.name: [] for f in fields}
        take: list[int] = []
        for k, i in enumerate(which):
            for s in range(n):
                c = done.get((k, s))
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
                if chunking:
                    out["document_tokens"].append(document_tokens.get(k, 0))
                    out["chunks"].append(n_chunks.get(k, 0))

        # 5b. After decoding: duplicate samples out, JSON parsed.
        if spec.generation.dedupe and n > 1:
            failed = [r == "error" for r in out["finish_reason"]]
            drop = postprocess.duplicate_samples(out["row_id"], out["generation"], failed)
            if drop:
                out = {name: [v for j, v in enumerate(col) if j not in drop] for name, col in out.items()}
                take = [v for j, v in enumerate(take) if j not in drop]
        if spec.output.parse == "json":
            for text, reason in zip(out["generation"], out["finish_reason"]):
                parsed, why = (postprocess.parse_generation(text, spec.output.json_schema)
                               if reason != "error" else (None, "no generation"))
                out["parsed"].append(parsed)
                out["parse_error"].append(why)
        chunks = windows_table(windows) if chunking else None
        return _with_input_columns(table, spec.input.columns, take, out, fields), chunks

    def _redo_errors(self, shard, committed_rel, table, rows, bad, row_ids):
        committed = self._read(committed_rel)
        keys = list(zip(committed.column("row_id").to_pylist(),
                        committed.column("sample_index").to_pylist()))
        reasons = committed.column("finish_reason").to_pylist()
        redo_keys = {key for key, r in zip(keys, reasons) if r == "error"}
        redo_rows = {r for r, _ in redo_keys}
        which = [i for i, r in enumerate(row_ids) if r in redo_rows]
        fresh, fresh_chunks = self._generate(table, rows, bad, row_ids, which)
        fresh = fresh.cast(committed.schema)
        position = {key: j for j, key in enumerate(zip(fresh.column("row_id").to_pylist(),
                                                      fresh.column("sample_index").to_pylist()))}
        # Committed rows in their order, each error row swapped for its new version (or left
        # out if it is now a duplicate of another sample of its row).
        take = [committed.num_rows + position[key] if key in redo_keys else j
                for j, key in enumerate(keys) if key not in redo_keys or key in position]
        merged = pa.concat_tables([committed, fresh]).take(pa.array(take, pa.int64()))
        chunks = None
        if fresh_chunks is not None:
            old = self._read(committed_rel.replace("data/", "chunks/", 1))
            kept = old.filter(pc.invert(pc.is_in(old.column("row_id"),
                                                 pa.array(sorted(redo_rows), pa.string()))))
            chunks = pa.concat_tables([kept, fresh_chunks.cast(old.schema)])
        return merged, chunks

    def _read(self, rel: str) -> pa.Table:
        with self.output.open_read(rel) as f:
            return pq.ParquetFile(f).read()

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


def _with_input_columns(table: pa.Table, keep: tuple[str, ...], take: list[int], out: dict,
                        out_fields: list[pa.Field]) -> pa.Table:
    indices = pa.array(take, pa.int64())
    arrays = [table.column(c).take(indices) for c in keep if c not in out]
    fields = [table.schema.field(c) for c in keep if c not in out]
    arrays += [pa.array(out[f.name], f.type) for f in out_fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields + out_fields))


def _verify_one_to_one(shard: Shard, row_ids: list[str], n: int, table: pa.Table,
                       partial: bool = False) -> None:
    """Exactly one output row per (row, sample index); with dedupe, at most one, and at least
    sample 0 of every row."""
    expected = {(r, s) for r in row_ids for s in range(n)}
    got = list(zip(table.column("row_id").to_pylist(), table.column("sample_index").to_pylist()))
    if partial:
        ok = len(set(got)) == len(got) and set(got) <= expected and {(r, 0) for r in row_ids} <= set(got)
        if not ok:
            raise ShardError(f"shard {shard.shard_id}: output rows do not match input rows")
        return
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
        texts[i] = wrap_prompt(spec, text, tokenizer)
    return texts, errors


def wrap_prompt(spec: JobSpec, text: str, tokenizer: Any) -> str:
    """Few-shot examples and, with chat: true, the model's chat template around a prompt."""
    if spec.input.chat:
        return tokenizer.apply_chat_template(
            prompts.chat_messages(spec.input, text), tokenize=False, add_generation_prompt=True
        )
    return prompts.with_examples(spec.input, text) if spec.input.examples else text


@dataclass
class Window:
    """One token window of a long document, summarized on its own (the map step)."""

    k: int  # the row, as an index into the rows being generated
    row_id: str
    index: int
    tokens: int
    request: Request
    completion: Any = None


def chunk_windows(spec: JobSpec, engine: Engine, rows: list[dict[str, Any]], row_ids: list[str],
                  long_rows: list[int], errors: list[str | None]) -> list[Window]:
    """Split each long row's document into windows of ``input.chunk_tokens`` tokens (default: what
    fits beside the template) overlapping by ``input.chunk_overlap``, as prompts. A row whose
    document cannot be split gets its ``errors`` entry set instead."""
    windows: list[Window] = []
    for k in long_rows:
        try:
            windows += _row_windows(spec, engine, rows[k], row_ids[k], k)
        except prompts.RowError as e:
            errors[k] = f"chunking: {e}"
    return windows


def _row_windows(spec: JobSpec, engine: Engine, row: dict[str, Any], row_id: str, k: int) -> list[Window]:
    inp = spec.input
    doc = row.get(inp.chunk_column)
    if not isinstance(doc, str):
        raise prompts.RowError(f"input.chunk_column {inp.chunk_column!r} is not text")
    doc_ids = engine.tokenize([doc])[0]
    size = inp.chunk_tokens
    if size is None:
        empty = wrap_prompt(spec, prompts.render(inp, {**row, inp.chunk_column: " "}), engine.tokenizer)
        overhead = len(engine.tokenize([empty], chat=inp.chat)[0])
        size = max(16, engine.max_input_tokens - overhead - 8)
    step = max(1, size - min(inp.chunk_overlap, size - 1))
    windows: list[Window] = []
    for j, start in enumerate(range(0, max(len(doc_ids) - inp.chunk_overlap, 1), step)):
        piece = engine.tokenizer.decode(doc_ids[start:start + size], skip_special_tokens=True)
        text = wrap_prompt(spec, prompts.render(inp, {**row, inp.chunk_column: piece}), engine.tokenizer)
        ids = engine.tokenize([text], chat=inp.chat)[0]
        try:
            ids = engine.fit(ids)
        except PromptTooLong:  # sized to fit; re-tokenizing a decoded window may add a few
            ids = tuple(ids[-engine.max_input_tokens:])
        seed = row_seed(spec.generation.seed, f"{row_id}\x1fchunk", j)
        windows.append(Window(k, row_id, j, len(doc_ids[start:start + size]), Request(ids, seed)))
    return windows


def windows_table(windows: list[Window]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in CHUNKS_SCHEMA}
    for w in windows:
        c = w.completion
        failed = c.finish_reason == "error"
        cols["row_id"].append(w.row_id)
        cols["chunk_index"].append(w.index)
        cols["chunk_tokens"].append(w.tokens)
        cols["prompt_tokens"].append(len(w.request.prompt_ids))
        cols["generation"].append(None if failed else c.text)
        cols["finish_reason"].append(c.finish_reason)
        cols["generated_tokens"].append(c.generated_tokens)
        cols["error"].append(c.error)
        cols["seed"].append(w.request.seed)
    return pa.Table.from_pydict(cols, schema=CHUNKS_SCHEMA)


def estimate_prompt_tokens(spec: JobSpec, plan: Plan, sample: int = 256) -> float:
    """Mean prompt tokens per row over the first rows of the input; loads only the tokenizer."""
    from batchgen.engine import load_tokenizer

    if not plan.shards:
        return 0.0
    tokenizer = None if spec.model.engine == "echo" else load_tokenizer(
        local_model(spec, weights=False)[0])
    first = plan.shards[0]
    table = read_rows(first.file, first.row_start, min(sample, first.row_count),
                      prompts.needed_columns(spec.input), input_options(spec), spec.input.format)
    texts = [t for t in render_prompts(spec, *_rows(table), tokenizer)[0] if t is not None]
    if not texts:
        return 0.0
    if tokenizer is None:
        return sum(len(t.split()) for t in texts) / len(texts)
    ids = tokenizer(texts, add_special_tokens=not spec.input.chat)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)
