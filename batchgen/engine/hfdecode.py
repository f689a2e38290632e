"""The Hugging Face path: batches decoded over transformers' own cache, rows dropped as they
finish. The engine uses it for models the slot path cannot serve (``probe``): attention that the
slot attention function does not implement, or models that do not call it.

Padding is on the left with a matching attention mask and position ids; prompts are prefilled
in groups of similar length whose caches are left-padded and stacked (not for models with
sliding-window layers, whose caches are not plain per-layer tensors of every key). Sampling is
the same ``Sampler`` as the slot path's, so a row's noise is the same on both paths.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from batchgen.engine.attention import use_own
from batchgen.engine.backoff import check_finite
from batchgen.engine.masks import apply_bitmask
from batchgen.engine.sampling import (
    Sampler, mark_seen, per_token, seen_from_prompts, token_logprobs
)

PREFILL_FILL = 0.9  # least share of real tokens among the prompt positions of a prefill group


def has_sliding_window(config: Any) -> bool:
    """Whether any layer attends over a window (or chunk) instead of every earlier key."""
    types = getattr(config, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    return bool(getattr(config, "sliding_window", None)) and getattr(
        config, "use_sliding_window", True) is not False


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
        self._keep_last = True
        self._can_stack_caches = not has_sliding_window(model.config)

    @torch.inference_mode()
    def run(self, requests: list[Any]) -> list[tuple[list[int], str, list]]:
        """(token ids, finish reason, per-token logprobs or []) per request."""
        use_own(self.model)
        B = len(requests)
        L = max(len(r.prompt_ids) for r in requests)
        dev = self.device

        # 1. Left-pad prompts; position ids count only real tokens.
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for row, r in enumerate(requests):
            n = len(r.prompt_ids)
            input_ids[row, L - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[row, L - n:] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seeds = torch.tensor([r.seed for r in requests], dtype=torch.long, device=dev)

        # 2. Prefill, in groups of similar length whose KV caches are then left-padded and
        # stacked: the decode batch stays whole while prompt padding stays small.
        lengths = [len(r.prompt_ids) for r in requests]
        cache, logits, padded = self._grouped_prefill(input_ids, mask, positions, lengths)
        self.padded_positions += padded
        next_pos = positions[:, -1:] + 1
        seen = None
        if self.gen.repetition_penalty != 1.0:
            seen = seen_from_prompts(logits.shape[-1], [r.prompt_ids for r in requests], dev)

        # 3. Decode until every row has stopped; finished rows leave the batch.
        active = list(range(B))  # batch row -> request index
        generated: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list] = [[] for _ in range(B)]
        reasons = ["length"] * B
        for step in range(self.gen.max_new_tokens):
            steps = torch.full((len(active),), step, dtype=torch.long, device=dev)
            allowed = logits
            if self.matchers is not None:
                allowed = apply_bitmask(logits, self.matchers.bitmask(active, dev))
            chosen = self.sampler.choose(allowed, seeds, steps, seen)
            tokens = chosen.tolist()
            lps = None
            if self.logprobs is not None:
                lps = per_token(*token_logprobs(logits, chosen, self.logprobs))
            still = []
            for row, (req, tok) in enumerate(zip(active, tokens)):
                generated[req].append(tok)
                if lps is not None:
                    logprobs[req].append(lps[row])
                if self.matchers is not None:
                    self.matchers.advance(req, tok)
                if tok in self.eos_ids or self.hit_stop(generated[req]):
                    reasons[req] = "stop"
                else:
                    still.append(row)
            if not still or step == self.gen.max_new_tokens - 1:
                break
            if seen is not None:
                mark_seen(seen, torch.arange(len(active), device=dev), chosen)
            step_tokens = chosen[:, None]
            if len(still) < len(active):
                keep = torch.tensor(still, device=dev)
                cache.batch_select_indices(keep)
                mask, next_pos, step_tokens = mask[keep], next_pos[keep], step_tokens[keep]
                seeds = seeds[keep]
                seen = None if seen is None else seen[keep]
                active = [active[row] for row in still]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(input_ids=step_tokens, attention_mask=mask, position_ids=next_pos,
                             past_key_values=cache, use_cache=True)
            self.steps += 1
            logits = _last_logits(out)
            next_pos = next_pos + 1
        return list(zip(generated, reasons, logprobs))

    def _grouped_prefill(self, input_ids, mask, positions, lengths):
        """(cache, last logits, prompt positions computed). Rows come longest first; a new
        group starts where adding a row would leave less than PREFILL_FILL of the group's
        positions real tokens."""
        B, L = input_ids.shape
        groups, start = [], 0
        for i in range(1, B + 1):
            if i == B or sum(lengths[start:i + 1]) < PREFILL_FILL * (i + 1 - start) * lengths[start]:
                groups.append((start, i))
                start = i
        if len(groups) > 1 and not self._can_stack_caches:
            groups = [(0, B)]
        if len(groups) == 1:
            out = self._prefill(input_ids, mask, positions)
            return out.past_key_values, _last_logits(out), B * L
        outs = []
        for a, b in groups:
            width = max(lengths[a:b])
            outs.append((self._prefill(input_ids[a:b, L - width:], mask[a:b, L - width:],
                                       positions[a:b, L - width:]), width))
        try:
            cache = _stack_left_padded([o.past_key_values for o, _ in outs], L)
        except (AttributeError, TypeError):  # a cache that is not plain per-layer K/V tensors
            self._can_stack_caches = False
            out = self._prefill(input_ids, mask, positions)
            return out.past_key_values, _last_logits(out), B * L
        logits = torch.cat([_last_logits(o) for o, _ in outs])
        return cache, logits, sum((b - a) * w for (a, b), (_, w) in zip(groups, outs))

    def _prefill(self, input_ids, mask, positions):
        """The prompt pass. Only the last position's logits are needed: asking for just those
        skips the LM head over every prompt token (rows x length x vocab multiply-adds)."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        if self._keep_last:
            try:
                return self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._keep_last = False
        return self.model(**kwargs)


def _stack_left_padded(caches: list[Any], length: int) -> Any:
    """One cache for all rows: each group's keys/values left-padded (zeros, masked out) to
    ``length`` and stacked along the batch, layer by layer, into the first group's cache."""
    merged = caches[0]
    for i, layer in enumerate(merged.layers):
        for name in ("keys", "values"):
            parts = [getattr(c.layers[i], name) for c in caches]
            setattr(layer, name, torch.cat(
                [F.pad(t, (0, 0, length - t.shape[-2], 0)) for t in parts], dim=0))
    return merged


def _last_logits(out: Any) -> torch.Tensor:
    return check_finite(out.logits[:, -1, :].float())
