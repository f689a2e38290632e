"""Choosing the next token of every row of a batch: greedy, or seeded sampling.

Stateless and counter-based: a row's choice is a pure function of its logits, the tokens it has
seen, its seed and the index of the token being chosen (its step), never of the other rows or of
any generator state. Rows may come and go between steps at no cost, a retry or a replay of the
same (seed, step) gives the same token whatever the batch, and ``Sampler.choose`` runs without a
host sync (no ``.item()``, no branch on tensor values), so it can live inside a CUDA graph.

Order: repetition penalty (CTRL-style, on the tokens in ``seen``) → greedy argmax, or
temperature → top-k → top-p (always keeping the likeliest token) → Gumbel-max:
``argmax(log_softmax(logits) + G)`` with ``G ~ Gumbel(0, 1)`` from ``gumbel_noise``.

The noise is an integer hash of (seed, step, token), computed on int64 tensors holding 32-bit
values (so every product wraps at most mod 2**64, whose low 32 bits are exact, then is masked back
to 32 bits; nothing negative is ever shifted right):

    fmix32(h)   = murmur3's 32-bit finalizer (xor-shift 16, * 0x85EBCA6B, xor-shift 13,
                  * 0xC2B2AE35, xor-shift 16), a bijection on 32 bits with full avalanche
    key[row]    = fmix32(fmix32(fmix32(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ (step mod 2**32))
    tok[t]      = fmix32(t ^ 0x7F4A7C15)
    bits[row,t] = fmix32(key[row] ^ tok[t])                   (all 32 bits are used)
    v           = min((bits + 1/2) / 2**32, 1 - 2**-24)       (float32, in (0, 1))
    G           = -log(-log1p(-v))                            (= -log(-log(u)) with u = 1 - v)

``u = 1 - v`` is uniform on (0, 1), both ends excluded. Writing it as ``1 - v`` and taking
``log1p(-v)`` keeps all 32 bits where they matter: the largest noise values (the ones that win
the argmax) come from the smallest ``v``, which float32 represents finely; the clamp only touches
the 128 values of ``bits`` that would round ``v`` to 1 (a mass of 2**-25, in the far left tail).
The integer part is bitwise the same on CPU and CUDA; the float part may differ in the last ulp.

Any change to the values drawn changes every sampled text: bump ``SAMPLER_VERSION`` with it.

Speed: ``gumbel_noise`` for B=32, V=50257 (1.6 M values), measured on this project's 2-core CPU
box (torch 2.13, in-place integer ops): best of 30 calls 7 ms on 2 threads, 11 ms on 1; medians
10-35 ms while other work shares the cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from batchgen.spec import GenerationSpec

SAMPLER_VERSION = 2  # bump when the sampled stream changes; 1 was the per-row torch.Generator sampler

_M32 = 0xFFFFFFFF
_V_MAX = 1.0 - 2.0**-24  # the largest float32 below 1


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer, in place on a fresh int64 tensor holding values in 0..2**32-1."""
    h ^= h >> 16
    h.mul_(0x85EBCA6B).bitwise_and_(_M32)  # < 2**64 before wrapping: the low 32 bits are exact
    h ^= h >> 13
    h.mul_(0xC2B2AE35).bitwise_and_(_M32)
    h ^= h >> 16
    return h


def _noise_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] int64 in 0..2**32-1: the hash of (seed, step, token) that ``gumbel_noise`` turns
    into noise. The same on every device, bit for bit."""
    seeds = seeds.to(torch.int64)
    key = _fmix32((seeds & _M32) ^ 0x9E3779B9)
    key = _fmix32(key ^ ((seeds >> 32) & _M32))  # a 63-bit seed is non-negative: no sign bits
    key = _fmix32(key ^ (steps.to(torch.int64) & _M32))
    tok = _fmix32(torch.arange(vocab, dtype=torch.int64, device=seeds.device) ^ 0x7F4A7C15)
    return _fmix32(key[:, None] ^ tok[None, :])


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Gumbel(0,1) noise, a pure function of (seed, step, token):
    seeds [B] int64 (63-bit non-negative row seeds), steps [B] int64 (the index of the token being
    chosen, 0 for the first new token; only its low 32 bits count).

    Integer hash on int64 tensors, no torch.Generator, no global RNG: bitwise the same on CPU and
    CUDA for the integer part, and the same value for a row whatever other rows are in the batch.
    """
    v = _noise_bits(seeds, steps, vocab).to(torch.float32)
    v = v.mul_(-(2.0**-32)).sub_(2.0**-33).clamp_(min=-_V_MAX)  # -v, v in (0, 1)
    return v.log1p_().neg_().log_().neg_()  # -log(-log(1 - v))


def mark_seen(seen: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """seen[rows[i], tokens[i]] = True for every i — writes only True (index_put_ with a True
    source), never a False, so duplicate indices cannot race."""
    seen.index_put_((rows, tokens), seen.new_ones(()))


def seen_from_prompts(vocab: int, prompts: list[Sequence[int]], device) -> torch.Tensor:
    """[len(prompts), vocab] bool: True at every token id of each prompt (pads are never included
    because callers pass real tokens only). Writes only True values: with a scatter of a mask
    mixing True (prompt) and False (padding), duplicates of one column (pad == EOS, and EOS in the
    prompt) would keep either one on CUDA."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    tokens = torch.tensor(list(chain.from_iterable(prompts)), dtype=torch.int64)
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"prompt token ids must lie in 0..{vocab - 1}, got "
                         f"{int(tokens.min())}..{int(tokens.max())}")
    rows = torch.repeat_interleave(torch.arange(len(prompts), dtype=torch.int64), lengths)
    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
    mark_seen(seen, rows.to(device), tokens.to(device))
    return seen


class Sampler:
    """Greedy or seeded sampling for one ``GenerationSpec``; holds no per-row state."""

    def __init__(self, gen: GenerationSpec):
        # Plain Python values, read once: choose() branches only on these, never on tensors.
        self.greedy = bool(gen.greedy)
        self.temperature = float(gen.temperature)
        self.top_k = int(gen.top_k)
        self.top_p = float(gen.top_p)
        self.repetition_penalty = float(gen.repetition_penalty)

    def choose(self, logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
               seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] float32 -> tokens [B] int64 on the same device.

        ``seeds`` [B] int64, ``steps`` [B] int64: see ``gumbel_noise``. ``seen`` [B, V] bool:
        the tokens each row has seen (its prompt and what it generated), for the repetition
        penalty; ignored when the penalty is off. No host sync."""
        penalty = self.repetition_penalty
        if penalty != 1.0 and seen is not None:
            if seen.shape != logits.shape:
                raise ValueError(f"seen has shape {tuple(seen.shape)}, logits "
                                 f"{tuple(logits.shape)}: size seen from the logits' width")
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalized, logits)
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        vocab = logits.shape[-1]
        if self.top_k and self.top_k < vocab:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self.top_p  # always keeps the likeliest token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        noise = gumbel_noise(seeds, steps, vocab)
        return (logits.log_softmax(dim=-1) + noise).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logprob of each row's token [B], the ``top`` likeliest tokens [B, top] and their
    logprobs [B, top], or None when top is 0), from ``logits`` as the model gave them (before
    penalty, temperature, top-k/top-p and any constraint: the distribution OpenAI reports).
    Device ops only."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    if not top:
        return chosen, None, None
    values, ids = logp.topk(top, dim=-1)
    return chosen, ids, values


def per_token(chosen: torch.Tensor, top_ids: torch.Tensor | None, top_lps: torch.Tensor | None
              ) -> list[tuple[float, list[int], list[float]]]:
    """``token_logprobs``' tensors as one (logprob, top ids, top logprobs) per row, on the host."""
    n = chosen.shape[0]
    ids = top_ids.tolist() if top_ids is not None else [[]] * n
    vals = top_lps.tolist() if top_lps is not None else [[]] * n
    return list(zip(chosen.tolist(), ids, vals))
