"""Output rows: their schema, their seeds, and their assembly from a shard's results.

Contract (the output's): exactly one row per (input row, sample index), keyed by ``row_id`` and
``sample_index``, with the columns of ``output_fields`` after the kept input columns; a row that
failed has ``finish_reason: error``, its message in ``error``, no generation. With
``generation.dedupe`` a row keeps sample 0 and drops exact repeats among its samples. Sampling
seeds derive from (job seed, row id, sample index) only, so a retried shard regenerates the
same text wherever it runs. No torch here.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pyarrow as pa

from batchgen.engine.completions import Completion
from batchgen.errors import ShardError
from batchgen.shard import postprocess, responses
from batchgen.spec import JobSpec

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
_TOKEN = [pa.field("token_id", pa.int32(), nullable=False), pa.field("token", pa.string()),
          pa.field("logprob", pa.float64(), nullable=False)]
LOGPROBS_TYPE = pa.list_(pa.struct(_TOKEN + [pa.field("top_logprobs",
                                                        pa.list_(pa.struct(_TOKEN)))]))
LOGPROB_FIELDS = [pa.field("logprobs", LOGPROBS_TYPE), pa.field("cumulative_logprob", pa.float64())]
SCORE_FIELDS = [pa.field("completion", pa.string()), pa.field("completion_tokens", pa.int32()),
                pa.field("completion_logprob", pa.float64()), pa.field("perplexity", pa.float64())]
TOOL_CALLS_TYPE = pa.list_(pa.struct([pa.field("name", pa.string(), nullable=False),
                                      pa.field("arguments", pa.string(), nullable=False)]))
REASONING_FIELDS = [pa.field("reasoning", pa.string())]
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


# Every column only some jobs write, by name: which ones a job writes, in which order, is
# ``JobSpec.optional_columns`` (the spec checks input.columns against the same list).
OPTIONAL_FIELDS = {f.name: f for f in [
    *PARSE_FIELDS, *CHUNK_FIELDS, *LOGPROB_FIELDS, *SCORE_FIELDS, *REASONING_FIELDS,
    pa.field("tool_calls", TOOL_CALLS_TYPE)]}


def output_fields(spec: JobSpec) -> list[pa.Field]:
    """The columns batchgen adds to every output row of this job."""
    return OUTPUT_FIELDS + [OPTIONAL_FIELDS[name] for name in spec.optional_columns()]


def logprob_rows(logprobs: Any) -> list[dict] | None:
    """engine.TokenLogprob values as the ``logprobs`` column's structs."""
    if logprobs is None:
        return None
    return [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token_id": i, "token": text, "logprob": v}
                              for i, text, v in t.top]} for t in logprobs]


def row_seed(job_seed: int, row_id: str, sample_index: int) -> int:
    """A 63-bit seed from (job seed, row id, sample index): the same wherever the row runs."""
    digest = hashlib.sha256(f"{job_seed}\x1f{row_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def row_dicts(table: pa.Table) -> tuple[list[dict[str, Any]], dict[int, str]]:
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


def assemble(
    spec: JobSpec,
    row_ids: list[str],
    texts: list[str | None],
    errors: list[str | None],
    prompt_tokens: dict[int, int],
    done: dict[tuple[int, int], Completion],
    chunk_counts: dict[int, tuple[int, int]] | None = None,
    tokenizer: Any = None,
) -> tuple[dict[str, list], list[int]]:
    """Output columns for rows ``0..len(row_ids)-1``, one entry per (row, sample index), and
    for each entry the row it came from. A (row, sample) without a completion, or with an error
    completion, is an error row (its message from the completion, else from ``errors``).
    ``chunk_counts``: (document tokens, windows) per row, when documents are chunked."""
    n = spec.generation.n
    out: dict[str, list] = {f.name: [] for f in output_fields(spec)}
    take: list[int] = []
    for k, row_id in enumerate(row_ids):
        for s in range(n):
            c = done.get((k, s))
            failed = c is None or c.finish_reason == "error"
            take.append(k)
            _add_row(out, spec, row_id, s, texts[k], prompt_tokens.get(k, 0),
                     generation=None if failed else c.text,
                     finish_reason="error" if failed else c.finish_reason,
                     generated_tokens=0 if failed else c.generated_tokens,
                     error=((c.error if c is not None else errors[k]) or "no completion")
                     if failed else None)
            if spec.generation.logprobs is not None:
                lps = None if failed else c.logprobs
                out["logprobs"].append(logprob_rows(lps))
                out["cumulative_logprob"].append(
                    None if lps is None else sum(t.logprob for t in lps))
            if chunk_counts is not None:
                document_tokens, windows = chunk_counts.get(k, (0, 0))
                out["document_tokens"].append(document_tokens)
                out["chunks"].append(windows)
    truncated = [False if (c := done.get((k, s))) is None else c.truncated
                 for k in range(len(row_ids)) for s in range(n)]
    return _after_decoding(spec, out, take, truncated, tokenizer)


def _add_row(out: dict[str, list], spec: JobSpec, row_id: str, sample: int, prompt: str | None,
             prompt_tokens: int, *, generation: str | None, finish_reason: str,
             generated_tokens: int, error: str | None) -> None:
    """The columns every output row has (``OUTPUT_FIELDS``), for one row."""
    for name, value in (("row_id", row_id), ("sample_index", sample), ("prompt", prompt),
                        ("generation", generation), ("finish_reason", finish_reason),
                        ("prompt_tokens", prompt_tokens), ("generated_tokens", generated_tokens),
                        ("error", error),
                        ("seed", row_seed(spec.generation.seed, row_id, sample))):
        out[name].append(value)


def assemble_scores(
    spec: JobSpec,
    row_ids: list[str],
    texts: list[str | None],
    errors: list[str | None],
    prompt_tokens: dict[int, int],
    completions: list[str | None],
    scores: dict[int, Any],
) -> tuple[dict[str, list], list[int]]:
    """Output columns of a scoring job (mode: score): one row per input row, with its
    completion's token count, log-likelihood and perplexity (``scores``: engine.Score per row
    that was scored; a row without one, or whose score failed, is an error row)."""
    out: dict[str, list] = {f.name: [] for f in output_fields(spec)}
    for k, row_id in enumerate(row_ids):
        sc = scores.get(k)
        failed = sc is None or sc.logprobs is None
        logprob = None if failed else sc.logprob
        tokens = None if failed else len(sc.logprobs)
        _add_row(out, spec, row_id, 0, texts[k], prompt_tokens.get(k, 0), generation=None,
                 finish_reason="error" if failed else "scored", generated_tokens=0,
                 error=((sc.error if sc is not None else errors[k]) or "not scored")
                 if failed else None)
        out["completion"].append(completions[k])
        out["completion_tokens"].append(tokens)
        out["completion_logprob"].append(logprob)
        out["perplexity"].append(None if failed else math.exp(-logprob / tokens))
        if spec.generation.logprobs is not None:
            out["logprobs"].append(None if failed else logprob_rows(sc.logprobs))
    return out, list(range(len(row_ids)))


def _after_decoding(spec: JobSpec, out: dict[str, list], take: list[int], truncated: list[bool],
                    tokenizer: Any = None) -> tuple[dict[str, list], list[int]]:
    """Reasoning split off (generation.reasoning_end), duplicate samples out
    (generation.dedupe), tool calls read (input.tools), outputs parsed: JSON (output.parse:
    json, JSON constraints) or checked complete (other constraints)."""
    if spec.generation.reasoning_end is not None:
        for j, (text, prompt) in enumerate(zip(out["generation"], out["prompt"])):
            reasoning = None
            if text is not None:
                reasoning, out["generation"][j] = responses.split_reasoning(
                    text, spec.generation.reasoning_end, prompt=prompt)
            out["reasoning"].append(reasoning)
    if spec.generation.dedupe and spec.generation.n > 1:
        failed = [r == "error" for r in out["finish_reason"]]
        drop = postprocess.duplicate_samples(out["row_id"], out["generation"], failed)
        if drop:
            out = {name: [v for j, v in enumerate(col) if j not in drop]
                   for name, col in out.items()}
            take = [v for j, v in enumerate(take) if j not in drop]
            truncated = [v for j, v in enumerate(truncated) if j not in drop]
    if spec.input.tools:
        calls = []
        for text, reason, prompt in zip(out["generation"], out["finish_reason"], out["prompt"]):
            calls.append(responses.parse_tool_calls(text, spec.input.tools, tokenizer,
                                                    prefix=prompt or "")
                         if reason != "error" and text is not None else (None, None))
        out["tool_calls"] = [c for c, _ in calls]
    if "parse_error" in out:
        for j, (text, reason) in enumerate(zip(out["generation"], out["finish_reason"])):
            parsed, why = _parsed(spec, text, reason, truncated[j])
            if why is None and spec.input.tools and calls[j][1] is not None:
                parsed, why = None, calls[j][1]
            out["parsed"].append(parsed)
            out["parse_error"].append(why)
    return out, take


_JSON_KINDS = ("json_schema", "json_object", "json_schema_column", "tool_call")


def _parsed(spec: JobSpec, text: str | None, reason: str, truncated: bool
            ) -> tuple[str | None, str | None]:
    """(parsed, parse_error) of one output row."""
    if reason == "error" or text is None:
        return None, "no generation"
    s = spec.generation.structured
    if truncated and reason == "length":
        return None, (f"truncated: generation.max_new_tokens ({spec.generation.max_new_tokens}) "
                      "ran out before the output was complete under generation.structured")
    if truncated:  # ended before the constraint started (a thinking that never ended)
        return None, ("incomplete: the generation ended before its output was complete under "
                      "generation.structured" + (f" (did it write {spec.generation.reasoning_end!r}?)"
                                                 if spec.generation.reasoning_end else ""))
    if s is not None and any(getattr(s, k) for k in _JSON_KINDS):  # the whole text is JSON
        return postprocess.parse_json(text, spec.output.json_schema)
    if spec.output.parse == "json":
        return postprocess.parse_generation(text, spec.output.json_schema)
    if s is not None:  # regex, choice, grammar: the text itself, complete
        return text, None
    return None, None  # tools only: the calls are the parsed output


def with_input_columns(table: pa.Table, keep: tuple[str, ...], take: list[int], out: dict,
                       out_fields: list[pa.Field]) -> pa.Table:
    """The output table: kept input columns (the input rows at ``take``), then ``out``."""
    indices = pa.array(take, pa.int64())
    arrays = [table.column(c).take(indices) for c in keep if c not in out]
    fields = [table.schema.field(c) for c in keep if c not in out]
    arrays += [pa.array(out[f.name], f.type) for f in out_fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields + out_fields))


def verify_one_to_one(shard_id: str, row_ids: list[str], n: int, table: pa.Table,
                      partial: bool = False) -> None:
    """Exactly one output row per (row, sample index); with dedupe, at most one, and at least
    sample 0 of every row."""
    expected = {(r, s) for r in row_ids for s in range(n)}
    got = list(zip(table.column("row_id").to_pylist(), table.column("sample_index").to_pylist()))
    if partial:
        ok = len(set(got)) == len(got) and set(got) <= expected and {(r, 0) for r in row_ids} <= set(got)
        if not ok:
            raise ShardError(f"shard {shard_id}: output rows do not match input rows")
        return
    if len(got) != len(expected) or set(got) != expected:
        raise ShardError(
            f"shard {shard_id}: output rows do not match input rows one-to-one "
            f"({len(got)} rows for {len(expected)} (row, sample) pairs)"
        )
