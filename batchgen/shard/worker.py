"""One shard, end to end, on one model replica. No Ray: the driver wraps this in an actor.

read rows → render prompts (``prompts``) → tokenize and fit, or window long documents
(``longdocs``) → engine → assemble and verify (``rows``) → write a local Parquet file →
check it → upload it whole to staging. A row that cannot be processed becomes an error row
(``finish_reason: error``); the shard goes on, even when every row is one. Only the driver
commits. Thread-safe: host work holds one lock, let go while a shard waits for the engine's feed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchgen.engine.completions import PromptTooLong, Request, ScoreRequest
from batchgen.engine.engine import Engine, load_engine
from batchgen.engine.versions import ENGINE_VERSION
from batchgen.errors import ShardError, SpecError
from batchgen.io import layout
from batchgen.io.inputs import Shard, read_rows
from batchgen.io.modelcache import local_model
from batchgen.io.storage import input_options, output_storage
from batchgen.shard import longdocs, prompts
from batchgen.shard.rows import (
    assemble, assemble_scores, output_fields, row_dicts, row_seed, verify_one_to_one,
    with_input_columns
)
from batchgen.spec import JobSpec


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
    seconds: float  # in the replica, reading to staging
    host: str
    parsed: int = 0  # rows whose generation parsed (output.parse: json)
    parse_errors: int = 0
    duplicates_removed: int = 0  # samples dropped by generation.dedupe
    chunked_rows: int = 0  # rows summarized window by window (long_documents: chunk)
    chunks: int = 0  # windows summarized
    staged_chunks: str | None = None  # the window summaries, staged beside the data
    engine: dict[str, Any] = field(default_factory=dict)  # version, path (and why) of the engine
    scored_tokens: int = 0  # completion tokens scored (mode: score)
    engine_seconds: float = 0.0  # of ``seconds``, in the engine (the rest: read, render, write)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PREFIX_MIN_TOKENS = 16  # a shorter shared prefix is not worth a split


def job_prefix(spec: JobSpec, engine: Any) -> tuple[int, ...]:
    """The tokens every prompt of this job starts with (``prompts.prefix_probes``), less the
    last one (a row's text may merge with it into another token), or () when short. Fixed by
    the spec and the tokenizer: a row's split never depends on its neighbours."""
    a, b = engine.tokenize(list(prompts.prefix_probes(spec, engine.tokenizer)),
                           chat=spec.input.chat)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    common -= 1
    return tuple(a[:common]) if common >= PREFIX_MIN_TOKENS else ()


def engine_record(engine: Any) -> dict[str, Any]:
    """What made a shard's text, for its done marker."""
    record = {"version": ENGINE_VERSION, "path": getattr(engine, "path", "echo")}
    if getattr(engine, "path_reason", ""):
        record["why"] = engine.path_reason
    if getattr(engine, "prefix", ()):
        record["prefix_tokens"] = len(engine.prefix)
    if not getattr(engine, "invariant", True):
        # A model family whose rows depend on their batch here: said where it is promised.
        record["batch_invariant"] = False
        record["not_invariant_because"] = engine.invariant_reason
    if getattr(engine, "grammars", None) is not None:
        from importlib.metadata import version

        record["grammar"] = f"llguidance {version('llguidance')}"
    return record


class ShardWorker:
    def __init__(self, spec: JobSpec, engine: Engine | None = None):
        self.spec = spec
        if engine is None:
            model, _ = local_model(spec)
            engine = load_engine(model, spec.generation, spec.resources)
        self.engine = engine
        if hasattr(engine, "set_prefix"):
            engine.set_prefix(job_prefix(spec, engine))
        self.constraint = self._job_constraint()
        self.output = output_storage(spec)
        self.in_options = input_options(spec)
        self.columns = prompts.job_columns(spec)
        self.feed = engine.feed() if hasattr(engine, "feed") else None  # None: lock held
        self._host = threading.Lock()  # held by a shard except while it waits for the engine
        self._shard = threading.local()  # this thread's shard: its seconds in the engine

    def run(self, shard: Shard, attempt: str | None = None, redo_errors: str | None = None) -> ShardResult:
        """Generate the shard and stage it. With ``redo_errors`` (the committed file of this
        shard, relative to the output), only its ``finish_reason: error`` rows are generated
        again; every other row is copied unchanged. Thread-safe (see the module's note)."""
        with self._host:
            self._shard.engine_seconds = 0.0
            return self._run(shard, attempt or uuid.uuid4().hex[:12], redo_errors)

    def _run(self, shard: Shard, attempt: str, redo_errors: str | None) -> ShardResult:
        started = time.perf_counter()
        # 1. Read this shard's rows, and only the columns the spec needs.
        table = read_rows(shard.file, shard.row_start, shard.row_count, self.columns,
                          self.in_options, self.spec.input.format)
        if table.num_rows != shard.row_count:
            raise ShardError(
                f"shard {shard.shard_id}: {shard.file} rows {shard.row_start}+{shard.row_count} "
                f"gave {table.num_rows} rows; the input changed since it was planned"
            )
        rows, bad = row_dicts(table)
        row_ids = self._row_ids(shard, rows)

        if redo_errors is None:
            result, chunks = self._generate(table, rows, bad, row_ids, range(len(rows)))
        else:
            result, chunks = self._redo_errors(shard, redo_errors, table, rows, bad, row_ids)
        verify_one_to_one(shard.shard_id, row_ids, self.spec.generation.n, result,
                          partial=self.spec.generation.dedupe)

        # 6. Write locally, check the footer, upload whole to staging (window summaries first:
        # the driver publishes them before the data, so data never points at missing chunks).
        rel = layout.staged_path(shard.shard_id, attempt)
        chunks_rel = None
        if chunks is not None:
            chunks_rel = layout.staged_path(shard.shard_id, attempt, "chunks")
            self._write_staged(chunks, chunks_rel)
        self._write_staged(result, rel)
        reasons = result.column("finish_reason").to_pylist()
        n_out = result.num_rows
        counts = {}
        if "parse_error" in result.column_names:
            parsed = result.column("parse_error").null_count
            counts["parsed"] = parsed
            counts["parse_errors"] = n_out - parsed
        if "completion_tokens" in result.column_names:  # mode: score
            counts["scored_tokens"] = sum(t or 0 for t in result.column("completion_tokens").to_pylist())
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
            engine_seconds=self._shard.engine_seconds,
            host=socket.gethostname(),
            duplicates_removed=len(rows) * self.spec.generation.n - n_out,
            staged_chunks=chunks_rel,
            engine=engine_record(self.engine),
            **counts,
        )

    def _generate(self, table, rows, bad, row_ids, which) -> tuple[pa.Table, pa.Table | None]:
        """Output rows for the input rows at indices ``which``: one per (row, sample index),
        and, when documents are chunked, one row per window summary."""
        spec, engine = self.spec, self.engine
        n, seed = spec.generation.n, spec.generation.seed
        which = list(which)
        sub_rows = [rows[i] for i in which]
        sub_ids = [row_ids[i] for i in which]
        chunking = spec.input.long_documents == "chunk"

        # 2. Prompts, per row; a row that fails keeps its error and the shard goes on.
        texts, errors = prompts.render_prompts(spec, sub_rows, {
            k: bad[i] for k, i in enumerate(which) if i in bad}, engine.tokenizer)

        # 2b. Each row's constraint (generation.structured); a bad per-row schema fails its row.
        constraints = self._constraints(sub_rows, errors)

        # 3. Tokenize once per row (a very long row only in part), fit to the context; samples
        # share the tokens. With chunking, a row too long for the budget is summarized window by
        # window instead.
        valid = [k for k in range(len(which)) if errors[k] is None]
        prompt_ids: dict[int, tuple[int, ...]] = {}
        long_rows: list[int] = []
        budget = engine.max_input_tokens
        keep = "right" if chunking else engine.truncation
        tokens = longdocs.tokenize_bounded(engine, [texts[k] for k in valid], chat=spec.input.chat,
                                           keep=keep)
        for k, tok in zip(valid, tokens):
            if chunking and budget is not None and (tok.part is not None or len(tok.ids) > budget):
                long_rows.append(k)
                continue
            try:
                prompt_ids[k] = longdocs.fit(engine, tok, len(texts[k]))
            except PromptTooLong as e:
                errors[k] = str(e)

        if spec.mode == "score":
            out, take = self._score(sub_rows, sub_ids, texts, errors, prompt_ids)
            return with_input_columns(table, spec.input.columns, [which[k] for k in take], out,
                                      output_fields(spec)), None

        # 4. Generate every (row, sample) that has a prompt, and every window of a long row;
        # each row under its constraint, if any (the windows are free, the reduce step is not).
        keys = [(k, s) for k in sorted(prompt_ids) for s in range(n)]
        requests = [Request(prompt_ids[k], row_seed(seed, sub_ids[k], s), constraints.get(k))
                    for k, s in keys]
        windows, doc_tokens = longdocs.chunk_windows(spec, engine, sub_rows, sub_ids, long_rows,
                                                     errors)
        completions = self._generate_all(requests + [w.request for w in windows])
        done = dict(zip(keys, completions))
        for w, c in zip(windows, completions[len(keys):]):
            w.completion = c
        chunk_counts = None
        if chunking:
            # 4b. Reduce: one prompt per long row over its window summaries, in order.
            ready, n_windows = longdocs.reduce_prompts(spec, engine, sub_rows, long_rows, windows,
                                                       texts, errors, prompt_ids)
            reduced = self._generate_all([Request(prompt_ids[k], row_seed(seed, sub_ids[k], 0),
                                                  constraints.get(k)) for k in ready])
            done.update({(k, 0): c for k, c in zip(ready, reduced)})
            counts = longdocs.document_tokens(engine, sub_rows, spec.input.chunk_column, doc_tokens)
            chunk_counts = {k: (counts[k], n_windows.get(k, 0)) for k in range(len(which))}

        # 5. Exactly one output row per (input row, sample index); then dedupe and parse.
        out, take = assemble(spec, sub_ids, texts, errors,
                             {k: len(ids) for k, ids in prompt_ids.items()}, done, chunk_counts,
                             tokenizer=engine.tokenizer)
        chunks = longdocs.windows_table(windows) if chunking else None
        return with_input_columns(table, spec.input.columns, [which[k] for k in take], out,
                                  output_fields(spec)), chunks

    def _generate_all(self, requests: list[Request]) -> list:
        """Timed into the shard's engine seconds; the host lock is let go while the feed works."""
        started = time.perf_counter()
        submitted = None if self.feed is None else self.feed.submit(requests)
        if submitted is not None:
            self._host.release()
        try:
            return self.engine.generate(requests) if submitted is None else submitted.result()
        finally:
            self._shard.engine_seconds += time.perf_counter() - started
            if submitted is not None:
                self._host.acquire()

    def _constraints(self, rows, errors) -> dict[int, Any]:
        """Each row's constraint (generation.structured), compiled for this replica's tokenizer;
        a row whose own schema is invalid, or cannot be compiled, becomes an error row and the
        shard goes on."""
        structured = self.spec.generation.structured
        if structured is None:
            return {}
        ok = [k for k in range(len(rows)) if errors[k] is None]
        if self.constraint is not None:  # the same for every row
            return dict.fromkeys(ok, self.constraint)
        from batchgen.spec.constraints import ConstraintError, constraint_for

        out = {}
        for k in ok:
            try:
                out[k] = constraint_for(structured, self.spec.input.tools, rows[k])
                self.engine.compile(out[k])
            except ConstraintError as e:
                errors[k] = str(e)
        return out

    def _job_constraint(self):
        """The constraint of every row (None without one, or with per-row schemas), compiled
        once when the replica starts: one this tokenizer cannot serve (a grammar naming a token
        it lacks) fails the job with the key, not every row."""
        s = self.spec.generation.structured
        if s is None or s.json_schema_column is not None:
            return None
        from batchgen.spec.constraints import ConstraintError, constraint_for

        try:
            constraint = constraint_for(s, self.spec.input.tools)
            self.engine.compile(constraint)
        except ConstraintError as e:
            raise SpecError(f"generation.structured: {e} (with this model's tokenizer)") from None
        return constraint

    def _score(self, rows, row_ids, texts, errors, prompt_ids):
        """mode: score: each row's completion column scored under its prompt."""
        spec, engine = self.spec, self.engine
        column = spec.input.completion_column
        limit = spec.generation.max_new_tokens
        completions: list[str | None] = [None] * len(rows)
        items: dict[int, tuple[int, ...]] = {}
        for k in sorted(prompt_ids):
            text = rows[k].get(column)
            if not isinstance(text, str) or not text:
                errors[k] = (f"completion column {column!r} is "
                             f"{'null' if text is None else 'empty' if text == '' else type(text).__name__ + ', not text'}")
                continue
            completions[k] = text
            ids = tuple(engine.tokenize_continuation([text])[0])
            if not ids:
                errors[k] = f"completion column {column!r} holds no tokens ({text!r})"
                continue
            if len(ids) > limit:
                errors[k] = (f"completion has {len(ids)} tokens, more than "
                             f"generation.max_new_tokens={limit} (the room scoring keeps after "
                             "the prompt); raise it")
                continue
            items[k] = ids
        order = sorted(items)
        started = time.perf_counter()
        scores = engine.score([ScoreRequest(prompt_ids[k], items[k]) for k in order])
        self._shard.engine_seconds += time.perf_counter() - started
        return assemble_scores(spec, row_ids, texts, errors,
                               {k: len(ids) for k, ids in prompt_ids.items()}, completions,
                               dict(zip(order, scores)))

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
            old = self._read(layout.chunks_of(committed_rel))
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
