"""Choosing the next token of every row of a batch: greedy, or seeded sampling.

Contract: a row's choice depends only on its logits, the tokens it has seen and its own seed,
never on the other rows: each row draws Gumbel noise from a ``torch.Generator`` of its own, after
repetition penalty → temperature → top-k → top-p (Gumbel-max: ``argmax(log p - log E)``,
``E ~ Exp(1)``). Rows may leave the batch as they finish (``select``).
"""

from __future__ import annotations

import torch

from batchgen.spec import GenerationSpec


class Sampler:
    """Greedy or seeded sampling over a batch whose rows may be dropped as they finish."""

    def __init__(self, gen: GenerationSpec, requests, input_ids, mask, device):
        self.gen = gen
        self.generators = None
        if not gen.greedy:
            self.generators = [
                torch.Generator(device=device).manual_seed(r.seed) for r in requests
            ]
        self.seen = None  # (rows, vocab) tokens already seen, built on first use
        self._prompt = (input_ids, mask) if gen.repetition_penalty != 1.0 else None

    def select(self, keep: torch.Tensor, rows: list[int]) -> None:
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows]
        if self.seen is not None:
            self.seen = self.seen[keep]

    def observe(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        g = self.gen
        if self._prompt is not None:
            if self.seen is None:  # sized from the logits: some models pad their vocabulary
                ids, mask = self._prompt
                self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                self.seen.scatter_(1, ids, mask.bool())
            penalized = torch.where(
                logits > 0, logits / g.repetition_penalty, logits * g.repetition_penalty
            )
            logits = torch.where(self.seen, penalized, logits)
        if g.greedy:
            return logits.argmax(dim=-1)
        logits = logits / g.temperature
        if g.top_k:
            k = min(g.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if g.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > g.top_p  # always keeps the likeliest token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        logp = logits.log_softmax(dim=-1)
        noise = torch.empty_like(logp)
        for row, gen in enumerate(self.generators):
            noise[row].exponential_(generator=gen)
        return (logp - noise.log()).argmax(dim=-1)
