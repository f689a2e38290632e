"""The Hugging Face path: batches decoded over transformers' own cache and attention. The engine
uses it for models the slot path cannot serve (``probe``): attention that the slot attention
function does not implement, or models that do not call it.

Batch invariance (ENGINE.md) on this path, with the model's own kernels: a row's result depends
only on its prompt and seed when every shape it meets is a function of the row alone.

- Width: a prompt is left-padded to ``prompt_width`` (its length + 1 rounded up to
  ``WIDTH_BLOCK``) with a matching attention mask and position ids. Its keys then always span
  width + step positions (attention's bits depend on the padded key length); the one padding
  position at least keeps the mask materialised for every row (a batch with no padding at all
  would let the model skip the mask, another kernel). Rows of different widths are decoded as
  separate batches (``run`` splits them; ``Engine.plan_batches`` cuts batches within a width).
- Rows: every GEMM sees a multiple of ``MIN_ROWS`` rows. The prefill's are width x rows; its LM
  head runs over the last ``MIN_ROWS`` positions of each row; decode batches are padded with
  copies of a row, and finished rows stay in the batch (their tokens dropped) until enough have
  finished to drop a multiple of ``MIN_ROWS``.
- Attention: on a CPU with 2+ threads a row's attention bits depend on its place in the call,
  so models that take an attention function run theirs row by row (``per_row_attention``).
- Sampling: ``Sampler``, the slot path's, noise a pure function of (seed, step, token).

What this cannot fix, ``invariance`` says: attention in a model's own code (bloom, falcon) on
2+ threads, experts not on ``experts``' invariant ones, length-dependent rotary (``rotary``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from batchgen.engine.attention import use_own
from batchgen.engine.backoff import check_finite
from batchgen.engine.masks import apply_bitmask
from batchgen.engine.prefill import MIN_ROWS, round_up
from batchgen.engine.sampling import (
    Sampler, mark_seen, per_token, seen_from_prompts, token_logprobs
)

# Prompt widths: length + 1 rounded up to this. Larger blocks pad prompts more, smaller ones
# cut more batches (one per width, each with its own decode steps). Measured (a granite of
# 8 layers x 512, 1 thread, one run each on a busy 2-core box), time over batches cut by length
# alone: 256 prompts of 1-200 tokens, 16 new tokens: +6% (16), +16% (32), +37% (64); 64 such
# prompts, 32 new tokens: +85%, +44%, +24% (fewer rows per width, more decode steps per row).
WIDTH_BLOCK = 16
# Config keys of mixture-of-experts layers (routed experts per token).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
ROWS = "batchgen_rows_"  # + the model's own attention ("sdpa", "eager"): ``per_row_attention``
_registered: set[str] = set()


def per_row_attention(own: str) -> Callable:
    """An attention function that runs the model's ``own`` one batch row at a time on a CPU
    with 2+ threads (else the whole batch at once). Measured (torch 2.13): CPU SDPA with a few
    queries per head, and eager attention's batched matmuls in a prefill, give a row other bits
    depending on its place in the call (which thread takes it); alone in its call, a row's bits
    are its own."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attend(module, query, key, value, attention_mask, **kwargs):
        if own == "eager":  # the model's own eager function (softcapping, sinks)
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[own]
        B = query.shape[0]
        if B == 1 or query.device.type != "cpu" or torch.get_num_threads() == 1:
            return fn(module, query, key, value, attention_mask, **kwargs)
        mask = attention_mask
        return torch.cat([fn(module, query[b:b + 1], key[b:b + 1], value[b:b + 1],
                             mask if mask is None or mask.shape[0] == 1 else mask[b:b + 1],
                             **kwargs)[0] for b in range(B)]), None

    return attend


def use_per_row(model: Any) -> str | None:
    """Put ``model`` on ``per_row_attention`` of its own attention; returns the attention to
    restore, or None when the model does not take an attention function (its own attention
    code: bloom, falcon) or its attention is neither sdpa nor eager."""
    own = model.config._attn_implementation
    if own not in ("sdpa", "eager") or not model._can_set_attn_implementation():
        return None
    if own == "eager" and not all(
            hasattr(sys.modules[type(m).__module__], "eager_attention_forward")
            for m in model.modules() if type(m).__name__.endswith("Attention")):
        return None
    name = ROWS + own
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(name, per_row_attention(own))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
        _registered.add(name)
    model.set_attn_implementation(name)
    return own


def prompt_width(length: int) -> int:
    """The padded width of a prompt of ``length`` tokens on this path: a function of the prompt
    alone, with at least one padding position."""
    return round_up(length + 1, WIDTH_BLOCK)


def left_pad(seqs: list, width: int, rows: int, pad_id: int, device) -> tuple:
    """(ids, attention mask, position ids) [rows, width] of ``seqs`` left-padded to ``width``,
    the rows past ``len(seqs)`` copies of the first; positions count only real tokens."""
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, seq in enumerate(seqs + [seqs[0]] * (rows - len(seqs))):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def invariance(model: Any, path: str = "hf") -> tuple[bool, str]:
    """(True, "") when a row's output on ``path`` ("hf", "slots") depends only on its prompt and
    seed, bitwise on this CPU at the current thread count; else (False, why). (On a GPU neither
    path is bitwise: ENGINE.md.)"""
    from batchgen.engine.experts import NAME as INVARIANT_EXPERTS
    from batchgen.engine.rotary import by_length

    config = model.config
    if (any(getattr(config, k, None) for k in _MOE_KEYS)
            and getattr(config, "_experts_implementation", None) != INVARIANT_EXPERTS):
        return False, ("mixture-of-experts layers on the model's own experts: each expert's GEMM "
                       "sees the rows routed to it, a count that depends on the other rows")
    if path != "hf":  # the slot path's rotary and attention are per row (rotary, attention)
        return True, ""
    if by_length(model):
        return False, ("rotary frequencies chosen from the longest sequence of each forward "
                       "pass (longrope, dynamic NTK) on the Hugging Face path")
    if torch.get_num_threads() > 1 and not model._can_set_attn_implementation():
        return False, ("attention in the model's own code (not transformers' AttentionInterface, "
                       "so not run row by row): on 2+ CPU threads a row's attention bits depend "
                       "on its place in the batch (measured: falcon)")
    return True, ""


class HFDecoder:
    def __init__(self, model: Any, gen: Any, *, eos_ids: set[int], pad_id: int,
                 hit_stop: Callable[[list[int]], bool], matchers: Any = None,
                 logprobs: int | None = None):
        self.model = model
        self.gen = gen
        self.sampler = Sampler(gen)
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.hit_stop = hit_stop
        self.matchers = matchers if matchers is not None and matchers.active else None
        self.logprobs = logprobs
        self.device = next(model.parameters()).device
        self.padded_positions = 0
        self.steps = 0  # decode steps (forward passes after the prefill)
        self.live: list[int] = []  # the batch rows of the pass running now that decode a request
        self._keep_last = True

    @torch.inference_mode()
    def run(self, requests: list[Any]) -> list[tuple[list[int], str, list]]:
        """(token ids, finish reason, per-token logprobs or []) per request. Requests of
        different widths (``prompt_width``) are decoded one width after another."""
        use_own(self.model)
        by_width: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_width.setdefault(prompt_width(len(r.prompt_ids)), []).append(i)
        results: list = [None] * len(requests)
        own = use_per_row(self.model) if self.device.type == "cpu" else None
        try:
            for width, indices in by_width.items():
                for i, out in zip(indices, self._run_width(requests, indices, width)):
                    results[i] = out
        finally:
            if own is not None:
                self.model.set_attn_implementation(own)
        return results

    def _run_width(self, requests: list[Any], indices: list[int], L: int) -> list:
        """Decode ``requests[i] for i in indices``, every prompt left-padded to ``L``."""
        B, dev = len(indices), self.device
        # The batch is padded to a multiple of MIN_ROWS rows with copies of the first prompt
        # before the prefill: no cache is reshaped unless rows finish (a linear-attention
        # hybrid's cache may not support that).
        rows = round_up(B, MIN_ROWS)

        # 1. Left-pad prompts; position ids count only real tokens.
        input_ids, mask, positions = left_pad(
            [requests[i].prompt_ids for i in indices], L, rows, self.pad_id, dev)
        self.live = list(range(B))
        out = self._prefill(input_ids, mask, positions)
        self.padded_positions += rows * L
        cache, logits = out.past_key_values, _last_logits(out)
        seen = None
        if self.gen.repetition_penalty != 1.0:
            seen = seen_from_prompts(logits.shape[-1], [requests[i].prompt_ids for i in indices]
                                     + [requests[indices[0]].prompt_ids] * (rows - B), dev)

        # 2. ``owner[row]``: the request a batch row decodes, None for padding and finished rows
        # (their tokens are dropped; their seed is -1, so no request's (seed, step) repeats).
        owner: list[int | None] = list(indices) + [None] * (rows - B)
        seeds = torch.tensor([requests[i].seed for i in indices] + [-1] * (rows - B),
                             dtype=torch.long, device=dev)
        next_pos = positions[:, -1:] + 1
        can_drop = callable(getattr(cache, "batch_select_indices", None))

        # 3. Decode until every row has stopped. Finished rows leave the batch only in
        # multiples of MIN_ROWS.
        generated: dict[int, list[int]] = {i: [] for i in indices}
        logprobs: dict[int, list] = {i: [] for i in indices}
        reasons = dict.fromkeys(indices, "length")
        for step in range(self.gen.max_new_tokens):
            steps = torch.full((len(owner),), step, dtype=torch.long, device=dev)
            allowed = logits
            if self.matchers is not None:
                allowed = apply_bitmask(logits, self.matchers.bitmask(owner, dev))
            chosen = self.sampler.choose(allowed, seeds, steps, seen)
            tokens = chosen.tolist()
            lps = None
            if self.logprobs is not None:
                lps = per_token(*token_logprobs(logits, chosen, self.logprobs))
            for row, (req, tok) in enumerate(zip(owner, tokens)):
                if req is None:
                    continue
                generated[req].append(tok)
                if lps is not None:
                    logprobs[req].append(lps[row])
                if self.matchers is not None:
                    self.matchers.advance(req, tok)
                if tok in self.eos_ids or self.hit_stop(generated[req]):
                    reasons[req] = "stop"
                    owner[row] = None
                    seeds[row] = -1
            live = [row for row, req in enumerate(owner) if req is not None]
            if not live or step == self.gen.max_new_tokens - 1:
                break
            if seen is not None:
                mark_seen(seen, torch.arange(len(owner), device=dev), chosen)
            step_tokens = chosen[:, None]
            if can_drop and round_up(len(live), MIN_ROWS) < len(owner):
                dead = [row for row, req in enumerate(owner) if req is None]
                keep = torch.tensor(live + dead[:round_up(len(live), MIN_ROWS) - len(live)],
                                    device=dev)
                cache.batch_select_indices(keep)
                mask, next_pos, step_tokens = mask[keep], next_pos[keep], step_tokens[keep]
                seeds = seeds[keep]
                seen = None if seen is None else seen[keep]
                owner = [owner[row] for row in keep.tolist()]
            mask = torch.cat([mask, mask.new_ones((len(owner), 1))], dim=1)
            self.live = [row for row, req in enumerate(owner) if req is not None]
            out = self.model(input_ids=step_tokens, attention_mask=mask, position_ids=next_pos,
                             past_key_values=cache, use_cache=True)
            self.steps += 1
            logits = out.logits[:, -1, :].float()
            check_finite(logits[self.live])  # a finished row past its end may overflow
            next_pos = next_pos + 1
        return [(generated[i], reasons[i], logprobs[i]) for i in indices]

    def _prefill(self, input_ids, mask, positions):
        """The prompt pass. Only the last position's logits are needed; asking for the last
        MIN_ROWS positions' skips the LM head over the rest of the prompt (rows x width x vocab
        multiply-adds) and keeps the head's row count a multiple of MIN_ROWS."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      use_cache=True)
        if self._keep_last:
            try:
                return self.model(**kwargs, logits_to_keep=MIN_ROWS)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._keep_last = False
        return self.model(**kwargs)


def _last_logits(out: Any) -> torch.Tensor:
    return check_finite(out.logits[:, -1, :].float())
