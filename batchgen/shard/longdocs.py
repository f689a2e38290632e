"""Rows longer than the model's input budget: cut before tokenizing, or map-reduce by windows.

``input.long_documents: truncate`` — ``tokenize_bounded`` never tokenizes a text whole when only
its first or last tokens can be kept: a 10 MB row would take gigabytes of token ids to keep 500.
It tokenizes the side that truncation keeps (``model.truncation: left`` keeps the end), in parts
of ``CHARS_PER_TOKEN`` characters per budget token, growing 4x until the part has
``MARGIN_TOKENS`` more tokens than the budget (or is the whole text). The kept tokens are then
those of the whole text: tokenizers split text into words before merging (byte-level BPE,
SentencePiece), so the cut changes only the first tokens of the part, which truncation drops.
With ``truncation: error`` a part over the budget proves the row too long.

``input.long_documents: chunk`` — a row over the budget has its ``input.chunk_column`` split into
windows of ``input.chunk_tokens`` tokens (default: what fits beside the template) overlapping by
``input.chunk_overlap``, each summarized on its own (map), then one prompt over the window
summaries in order (``input.reduce_template``, reduce). Contract: the windows cover every token
of the document, and a row that cannot be windowed becomes an error row, never a partial summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchgen.engine.completions import PromptTooLong, Request
from batchgen.errors import SpecError
from batchgen.shard import prompts
from batchgen.shard.rows import CHUNKS_SCHEMA, row_seed
from batchgen.spec import JobSpec

if TYPE_CHECKING:
    from batchgen.engine.engine import Engine

CHARS_PER_TOKEN = 16  # English is ~4 characters per token; code with long runs of spaces ~8-16
MARGIN_TOKENS = 64  # tokens beyond the budget that absorb the change at the cut
# Tokens a default window leaves free beside the template: a window's text, decoded and tokenized
# again inside the template, may come back a few tokens longer.
WINDOW_MARGIN = 8


# -- truncate ---------------------------------------------------------------------------------


@dataclass
class Tokens:
    ids: list[int]
    part: int | None = None  # characters tokenized, when not the whole text (it is over budget)


def tokenize_bounded(engine: Engine, texts: list[str], *, chat: bool, keep: str) -> list[Tokens]:
    """Token ids per text; a text too long for ``engine.max_input_tokens`` by far is tokenized
    only in part, from the side ``keep`` ('left' keeps the end; 'right' and 'error' the start).
    Texts that fit are tokenized whole, together."""
    limit = engine.max_input_tokens
    if not texts:
        return []  # tokenizers fail on an empty batch
    bound = None if limit is None else CHARS_PER_TOKEN * (limit + MARGIN_TOKENS)
    whole = [i for i, t in enumerate(texts) if bound is None or len(t) <= bound]
    result: list[Tokens | None] = [None] * len(texts)
    if whole:
        for i, ids in zip(whole, engine.tokenize([texts[i] for i in whole], chat=chat)):
            result[i] = Tokens(ids)
    for i, text in enumerate(texts):
        if result[i] is None:
            result[i] = _tokenize_part(engine, text, chat=chat, keep=keep, chars=bound)
    return result  # type: ignore[return-value]


def _tokenize_part(engine: Engine, text: str, *, chat: bool, keep: str, chars: int) -> Tokens:
    limit = engine.max_input_tokens
    while chars < len(text):
        ids = engine.tokenize([text[-chars:] if keep == "left" else text[:chars]], chat=chat)[0]
        if len(ids) >= limit + MARGIN_TOKENS:
            return Tokens(ids, chars)
        chars *= 4  # long tokens (runs of spaces, say): a larger part
    return Tokens(engine.tokenize([text], chat=chat)[0])


def fit(engine: Engine, tokens: Tokens, text_chars: int) -> tuple[int, ...]:
    """``engine.fit`` (model.max_input_tokens, model.truncation) of a text's tokens, which may be
    a part of it; raises PromptTooLong."""
    if tokens.part is not None and engine.truncation == "error":
        raise PromptTooLong(
            f"prompt has more than {engine.max_input_tokens} tokens (its first {tokens.part:,} of "
            f"{text_chars:,} characters alone have {len(tokens.ids)}), more than "
            f"model.max_input_tokens={engine.max_input_tokens} (set model.truncation to left or "
            "right to cut it instead)"
        )
    return engine.fit(tokens.ids)


# -- chunk: map --------------------------------------------------------------------------------


@dataclass
class Window:
    """One token window of a long document, summarized on its own (the map step)."""

    k: int  # the row, as an index into the rows being generated
    row_id: str
    index: int
    tokens: int
    request: Request
    completion: Any = None


def window_starts(n_tokens: int, size: int, overlap: int) -> range:
    """Where windows of ``size`` tokens start so that consecutive ones share ``overlap`` tokens
    and together cover tokens ``0..n_tokens-1``: the last reaches the end, and none lies
    wholly inside the one before it."""
    if not 0 <= overlap < size:
        raise ValueError(f"overlap {overlap} must be in [0, {size})")
    return range(0, max(n_tokens - overlap, 1), size - overlap)


def chunk_windows(
    spec: JobSpec, engine: Engine, rows: list[dict[str, Any]], row_ids: list[str],
    long_rows: list[int], errors: list[str | None],
) -> tuple[list[Window], dict[int, int]]:
    """Each long row's document as window prompts, and its length in tokens. A row whose
    document cannot be split gets its ``errors`` entry set instead."""
    windows: list[Window] = []
    document_tokens: dict[int, int] = {}
    for k in long_rows:
        try:
            parts, document_tokens[k] = _row_windows(spec, engine, rows[k], row_ids[k], k)
        except prompts.RowError as e:
            errors[k] = f"chunking: {e}"
            continue
        windows += parts
    return windows, document_tokens


def _row_windows(spec: JobSpec, engine: Engine, row: dict[str, Any], row_id: str,
                 k: int) -> tuple[list[Window], int]:
    inp = spec.input
    doc = row.get(inp.chunk_column)
    if not isinstance(doc, str):
        raise prompts.RowError(f"input.chunk_column {inp.chunk_column!r} is not text")
    doc_ids = engine.tokenize([doc])[0]
    size = inp.chunk_tokens or _default_window(spec, engine, row)
    if inp.chunk_overlap >= size:
        # Only with the default window: the spec refuses an overlap >= input.chunk_tokens.
        raise prompts.RowError(
            f"input.chunk_overlap={inp.chunk_overlap} is not smaller than the window of {size} "
            f"tokens that fits beside the template in model.max_input_tokens="
            f"{engine.max_input_tokens} (input.chunk_tokens is unset); lower input.chunk_overlap "
            "or set input.chunk_tokens"
        )
    windows: list[Window] = []
    for j, start in enumerate(window_starts(len(doc_ids), size, inp.chunk_overlap)):
        piece_ids = doc_ids[start:start + size]
        piece = engine.tokenizer.decode(piece_ids, skip_special_tokens=True)
        text = prompts.wrap_prompt(spec, prompts.render(inp, {**row, inp.chunk_column: piece}),
                                   engine.tokenizer)
        ids = engine.tokenize([text], chat=inp.chat)[0]
        if engine.max_input_tokens is not None and len(ids) > engine.max_input_tokens:
            # Never cut silently: the cut would drop part of the document from the summary.
            raise prompts.RowError(
                f"window {j} ({len(piece_ids)} document tokens) makes a prompt of {len(ids)} "
                f"tokens with the template, more than model.max_input_tokens="
                f"{engine.max_input_tokens}; lower input.chunk_tokens"
                + ("" if inp.chunk_tokens else " (set it: the default window did not fit "
                   "beside this row's other columns)"))
        seed = row_seed(spec.generation.seed, f"{row_id}\x1fchunk", j)
        windows.append(Window(k, row_id, j, len(piece_ids), Request(ids, seed)))
    return windows, len(doc_ids)


def _template_tokens(spec: JobSpec, row: dict[str, Any], count: Any, tokenizer: Any) -> int:
    """Tokens the prompt of ``row`` takes beside its document (the template and the chat
    wrapping around a one-space document); ``count``: text -> its number of tokens. Raises
    RowError when the template cannot render the row."""
    inp = spec.input
    text = prompts.wrap_prompt(spec, prompts.render(inp, {**row, inp.chunk_column: " "}),
                               tokenizer)
    return count(text)


def _default_window(spec: JobSpec, engine: Engine, row: dict[str, Any]) -> int:
    """Document tokens that fit in the input budget beside the template and chat wrapping."""
    overhead = _template_tokens(spec, row, lambda t: len(engine.tokenize(
        [t], chat=spec.input.chat)[0]), engine.tokenizer)
    return max(16, engine.max_input_tokens - overhead - WINDOW_MARGIN)


def check_windows(spec: JobSpec, tokenizer: Any, budget: int | None) -> None:
    """Refuse, when the job is planned, a chunking setup that would make every row an error
    row: windows (``input.chunk_tokens``) that cannot fit beside the template in the prompt
    budget, or an overlap (``input.chunk_overlap``) not smaller than the largest default window.
    The template is rendered with empty columns, so a row's own columns only make its room
    smaller (and such a row an error row). ``tokenizer``: a transformers-like tokenizer (the
    plan's light one, no torch)."""
    inp = spec.input
    if budget is None:
        return
    try:
        overhead = _template_tokens(
            spec, dict.fromkeys(prompts.needed_columns(inp), ""),
            lambda t: len(tokenizer([t], add_special_tokens=not inp.chat)["input_ids"][0]),
            tokenizer)
    except prompts.RowError:
        return  # a template that cannot render empty columns: its rows are checked one by one
    room = budget - overhead
    if inp.chunk_tokens is not None and inp.chunk_tokens > room:
        raise SpecError(
            f"input.chunk_tokens={inp.chunk_tokens} does not fit: the template takes {overhead} "
            f"of model.max_input_tokens={budget} tokens, which leaves at most {room} for a "
            f"window; lower input.chunk_tokens to {max(room, 1)} or less")
    window = max(16, room - WINDOW_MARGIN)  # what _default_window gives a row of empty columns
    if inp.chunk_tokens is None and inp.chunk_overlap >= window:  # (the spec checks the other)
        raise SpecError(
            f"input.chunk_overlap={inp.chunk_overlap} is not smaller than the window of at most "
            f"{window} tokens that fits beside the template in model.max_input_tokens={budget} "
            f"(input.chunk_tokens is unset); lower input.chunk_overlap below {window} or set "
            "input.chunk_tokens")


def document_tokens(engine: Engine, rows: list[dict[str, Any]], column: str,
                    known: dict[int, int]) -> dict[int, int]:
    """Tokens in each row's document (0 when it is not text); ``known`` are counted already."""
    todo = [k for k, row in enumerate(rows) if k not in known and isinstance(row.get(column), str)]
    counts = dict(known)
    if todo:
        counts.update(zip(todo, map(len, engine.tokenize([rows[k][column] for k in todo]))))
    return {k: counts.get(k, 0) for k in range(len(rows))}


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


# -- chunk: reduce -------------------------------------------------------------------------------


def reduce_prompts(spec: JobSpec, engine: Engine, rows: list[dict[str, Any]], long_rows: list[int],
                   windows: list[Window], texts: list[str | None], errors: list[str | None],
                   prompt_ids: dict[int, tuple[int, ...]]) -> tuple[list[int], dict[int, int]]:
    """After the map step: one prompt per long row over its window summaries, in order, put in
    ``texts`` and ``prompt_ids``; rows whose window failed, or whose reduce prompt cannot be
    made, get their ``errors`` entry instead. Returns the rows to generate, and windows per row."""
    ready: list[int] = []
    n_windows: dict[int, int] = {}
    for k in long_rows:
        if errors[k] is not None:  # its document could not be split
            continue
        parts = [w for w in windows if w.k == k]
        n_windows[k] = len(parts)
        failed = [w for w in parts if w.completion.finish_reason == "error"]
        if failed:
            errors[k] = f"window {failed[0].index}: {failed[0].completion.error}"
            continue
        try:
            text = prompts.render(spec.input, {**rows[k], "summaries": [
                w.completion.text for w in parts]}, spec.input.reduce_template,
                "input.reduce_template")
            text = prompts.wrap_prompt(spec, text, engine.tokenizer)
            [tokens] = tokenize_bounded(engine, [text], chat=spec.input.chat,
                                        keep=engine.truncation)
            prompt_ids[k] = fit(engine, tokens, len(text))
        except (prompts.RowError, PromptTooLong) as e:
            errors[k] = f"reduce: {e}"
            continue
        texts[k] = text
        ready.append(k)
    return ready, n_windows
