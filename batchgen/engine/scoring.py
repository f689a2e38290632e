"""Teacher-forced scoring: the log-probability of a given completion after its prompt, token by
token, with the ``top`` likeliest alternatives of each (``mode: score``).

On the slot path the prompt and completion are prefilled like a prompt, the job prefix's keys
shared and the forwards packed under the token budget, with no decode step; on the Hugging Face
path, one left-padded forward per batch with the LM head over the completion's positions only.
Either way a completion's logprobs are read from the model's own distribution, so a generated
row's logprobs sum to the score of its tokens.
"""

from __future__ import annotations

import torch

from batchgen.engine.attention import use_own, use_slots
from batchgen.engine.backoff import check_finite
from batchgen.engine.hfdecode import HFDecoder, left_pad, prompt_width, use_per_row
from batchgen.engine.prefill import MIN_ROWS, PREFILL_BLOCK, SlotModel, round_up
from batchgen.engine.sampling import per_token, token_logprobs


@torch.inference_mode()
def score_slots(decoder: SlotModel, items: list[tuple[tuple[int, ...], tuple[int, ...]]],
                top: int | None = None) -> list[list[tuple[float, list[int], list[float]]]]:
    """Teacher-forced log-likelihood: for each (prompt, completion), per completion token
    (its logprob given the prompt and the completion before it, its ``top`` likeliest
    alternatives' ids and logprobs). Prefilled like prompts (the job prefix's keys shared, packed
    forwards under the token budget); no decode steps."""
    if not items:
        return []
    use_slots(decoder.model)
    seqs = [(tuple(p) + tuple(c[:-1]), len(p)) for p, c in items]
    shapes = [_score_shape(decoder, seq, n) for seq, n in seqs]
    decoder.hold([sum(shape) for shape in shapes])
    out: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: (shapes[i], i))
    while order:
        chunk, tokens = [], 0
        while order and len(chunk) < decoder.cache.free and (
                not chunk or tokens + shapes[order[0]][1] <= decoder.max_batch_tokens):
            chunk.append(order.pop(0))
            tokens += shapes[chunk[-1]][1]
        slots = [decoder.cache.take() for _ in chunk]
        hidden, starts = decoder.forward([(shapes[i], seqs[i][0], slot)
                                        for i, slot in zip(chunk, slots)])
        for i, at in zip(chunk, starts):
            offset = shapes[i][0]
            first = at + seqs[i][1] - offset - 1  # the prompt's last position
            completion = items[i][1]
            at_rows = torch.arange(first, first + len(completion), device=decoder.device)
            targets = torch.tensor(completion, dtype=torch.long, device=decoder.device)
            logits = check_finite(decoder.logits(hidden[at_rows]))
            out[i] = per_token(*token_logprobs(logits, targets, top or 0))
        for slot in slots:
            decoder.cache.release(slot)
    return out


def _score_shape(decoder: SlotModel, seq: tuple[int, ...], prompt_len: int) -> tuple[int, int]:
    """(split, width) of a scored sequence: the prefix split is the prompt's (the first
    scored position, the prompt's last token, is never inside the prefix)."""
    s = decoder.split(seq[:prompt_len])
    return s, round_up(len(seq) - s, PREFILL_BLOCK)


@torch.inference_mode()
def score_hf(decoder: HFDecoder, items: list[tuple[tuple[int, ...], tuple[int, ...]]],
             top: int | None = None) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
    """Teacher-forced logprobs of each completion after its prompt (see
    ``score_slots``): one left-padded forward over prompt + completion per padded width, the
    LM head over the last positions only (a completion's logits are its row's last ones).
    Shapes as ``hfdecode``'s, so a row's scores do not depend on its batch: each sequence
    padded to its own width (``prompt_width``), rows to a multiple of MIN_ROWS, attention row
    by row on 2+ CPU threads."""
    if not items:
        return []
    use_own(decoder.model)
    own = use_per_row(decoder.model) if decoder.device.type == "cpu" else None
    seqs = [tuple(p) + tuple(c[:-1]) for p, c in items]
    by_width: dict[int, list[int]] = {}
    for i, q in enumerate(seqs):
        by_width.setdefault(prompt_width(len(q)), []).append(i)
    results: list = [None] * len(items)
    try:
        for width, indices in by_width.items():
            for i, r in zip(indices, _score_width(decoder, items, seqs, indices, width, top)):
                results[i] = r
    finally:
        if own is not None:
            decoder.model.set_attn_implementation(own)
    return results


def _score_width(decoder, items, seqs, indices, L, top):
    dev = decoder.device
    rows = round_up(len(indices), MIN_ROWS)
    keep = max(len(items[i][1]) for i in indices)
    ids, mask, positions = left_pad([seqs[i] for i in indices], L, rows, decoder.pad_id, dev)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    try:
        logits_all = decoder.model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model whose forward has no logits_to_keep
        logits_all = decoder.model(**kwargs).logits
    decoder.padded_positions += rows * L
    results = []
    for row, i in enumerate(indices):
        c = items[i][1]
        logits = check_finite(logits_all[row, logits_all.shape[1] - len(c):].float())
        results.append(per_token(*token_logprobs(
            logits, torch.tensor(c, dtype=torch.long, device=dev), top or 0)))
    return results
