"""Attention over the slot cache, registered with transformers' ``AttentionInterface``.

Any Hugging Face causal LM whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` runs on the
slot cache without per-model code: the decoder calls the model with ``use_cache=False``,
explicit ``position_ids`` and a ``batchgen_slots`` keyword argument (a ``Prefill`` or a
``Decode``), which transformers forwards to this function in every layer. The function writes
the layer's new keys and values into the sequences' slots and attends over each slot's keys.

Batch invariance (ENGINE.md): a row's result must not depend on the other rows or on the padded
key length. Decode rows are grouped by their own key length rounded up to ``KEY_BLOCK``, one
SDPA call per group (over the cache in place for a large group, over gathered keys for a small
one), so a row always attends over the same key length whatever its neighbours; prefill prompts
come packed into one sequence, attention per segment of one width (fixed by the prompt alone).
Grouped-query heads are packed into the query axis instead of repeating keys. Sliding windows
(per layer, from the ``sliding_window`` argument) are masks over the slot's keys.

What a plain attention function cannot serve raises ``Unsupported`` (logit softcapping,
attention sinks); the load-time probe (``probe``) catches those and anything else that makes the
output differ from Hugging Face's own path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from batchgen.engine.slots import SlotCache

NAME = "batchgen_slots"
KWARG = "batchgen_slots"
KEY_BLOCK = 64  # decode key lengths are rounded up to this
IN_PLACE_SHARE = 4  # a decode group of at least 1/4 of the slots attends over the cache in place


class Unsupported(RuntimeError):
    """The model's attention needs something this function does not do."""


@dataclass
class Segment:
    """Rows of one prefill shape, contiguous in the packed sequence from token ``start``: each
    row ``width`` tokens, written after ``offset`` keys already in its slot (the job prefix)."""

    slots: torch.Tensor  # [rows]
    offset: int
    width: int
    start: int


@dataclass
class Prefill:
    """New tokens of several prompts packed into one sequence (batch 1), in segments of one
    shape each. The model's linear layers see every token in one GEMM (a row's bits do not
    depend on the row count: a multiple of ``PREFILL_BLOCK``); attention runs per segment."""

    cache: SlotCache
    segments: list[Segment]
    layers_seen: set[int] = field(default_factory=set)
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    def mask(self, seg: Segment, sliding_window: int | None, groups: int, device) -> torch.Tensor:
        key = (seg.offset, seg.width, sliding_window, groups)
        m = self._masks.get(key)
        if m is None:
            q = torch.arange(seg.width, device=device)[:, None] + seg.offset
            k = torch.arange(seg.offset + seg.width, device=device)[None, :]
            m = k <= q
            if sliding_window:
                m = m & (k > q - sliding_window)
            m = self._masks[key] = m.repeat(groups, 1)[None, None]
        return m


@dataclass
class Decode:
    """One new token for each of B rows (padding rows included), written at ``positions`` in
    ``slots``. ``groups``: (batch rows, their key length) for rows of one key-length bucket."""

    cache: SlotCache
    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B] where each row's new key goes (its length so far)
    groups: list[tuple[torch.Tensor, int]]
    layers_seen: set[int] = field(default_factory=set)
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)

    def mask(self, g: int, sliding_window: int | None) -> torch.Tensor:
        """[slots + 1, 1, 1, length] for group g: each of its rows' slot sees its own keys (and
        no more than the window); every other slot sees key 0 only (its result is dropped)."""
        key = (g, sliding_window)
        m = self._masks.get(key)
        if m is None:
            rows, length = self.groups[g]
            q = self.positions[rows][:, None]
            k = torch.arange(length, device=q.device)[None, :]
            mine = k <= q
            if sliding_window:
                mine = mine & (k > q - sliding_window)
            m = torch.zeros((self.cache.slots + 1, length), dtype=torch.bool, device=q.device)
            m[:, 0] = True
            m[self.slots[rows]] = mine
            m = self._masks[key] = m[:, None, None, :]
        return m


def key_length(position: int) -> int:
    """The key length a decode row at ``position`` attends over (its new key included)."""
    return -(-(position + 1) // KEY_BLOCK) * KEY_BLOCK


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, s_aux=None, **kwargs):
    step = kwargs.get(KWARG)
    if step is None:
        raise Unsupported("the slot attention was called without its batchgen_slots argument")
    if softcap is not None:
        raise Unsupported("attention logit softcapping")
    if s_aux is not None:
        raise Unsupported("attention sinks")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise Unsupported("an attention module without layer_idx")
    step.layers_seen.add(layer)
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if Hq % Hkv:
        raise Unsupported(f"{Hq} query heads over {Hkv} key heads")
    G = Hq // Hkv
    keys, values = step.cache.layer(layer, key)
    if isinstance(step, Prefill):
        outs = []
        for seg in step.segments:
            rows, width, offset = seg.slots.shape[0], seg.width, seg.offset
            span = slice(seg.start, seg.start + rows * width)

            def per_row(t: torch.Tensor, heads: int) -> torch.Tensor:  # -> [rows, heads, W, D]
                return t[0, :, span].reshape(heads, rows, width, D).transpose(0, 1)

            k, v = per_row(key, Hkv), per_row(value, Hkv)
            end = offset + width
            keys[seg.slots, :, offset:end] = k
            values[seg.slots, :, offset:end] = v
            if offset:
                k, v = keys[seg.slots, :, :end], values[seg.slots, :, :end]
            q = per_row(query, Hq).reshape(rows, Hkv, G * width, D)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=step.mask(seg, sliding_window, G, query.device), scale=scaling)
            outs.append(o.reshape(rows, Hq, width, D).transpose(0, 1).reshape(Hq, -1, D))
        return torch.cat(outs, dim=1)[None].transpose(1, 2), None
    # Decode: T == 1. One call per key-length group, so a row's result depends only on its own
    # key length, never on its neighbours (tests/engine/test_slots.py).
    keys[step.slots, :, step.positions] = key[:, :, 0]
    values[step.slots, :, step.positions] = value[:, :, 0]
    out = query.new_empty(B, Hkv, G, D)
    q_all = query.reshape(B, Hkv, G, D)
    if query.device.type == "cpu":
        # On the CPU, SDPA with one query per head (no GQA) on 2+ threads gives a row other bits
        # depending on the rows in the call; batched matmuls (one GEMM per row and head, of a
        # fixed shape) and a softmax per row do not.
        for g, (rows, length) in enumerate(step.groups):
            slots = step.slots[rows]
            scores = torch.matmul(q_all[rows], keys[slots, :, :length].transpose(-1, -2))
            scores = scores.float().mul_(scaling if scaling is not None else D ** -0.5)
            scores.masked_fill_(~step.mask(g, sliding_window)[slots], float("-inf"))
            probs = scores.softmax(-1).to(values.dtype)
            out[rows] = torch.matmul(probs, values[slots, :, :length])
        return out.reshape(B, Hq, 1, D).transpose(1, 2), None
    # On a GPU: a large group attends over the cache in place, every slot at once, its queries
    # scattered to their slots (no copy of keys); a small one gathers its rows' keys.
    q_slots = None
    for g, (rows, length) in enumerate(step.groups):
        slots = step.slots[rows]
        if rows.shape[0] * IN_PLACE_SHARE >= keys.shape[0]:
            if q_slots is None:
                q_slots = query.new_zeros(keys.shape[0], Hkv, G, D)
            q_slots[slots] = q_all[rows]
            out[rows] = F.scaled_dot_product_attention(
                q_slots, keys[:, :, :length], values[:, :, :length],
                attn_mask=step.mask(g, sliding_window), scale=scaling)[slots]
        else:
            out[rows] = F.scaled_dot_product_attention(
                q_all[rows], keys[slots, :, :length], values[slots, :, :length],
                attn_mask=step.mask(g, sliding_window)[slots], scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None


_registered = False


def use_slots(model: Any) -> None:
    """Put the model on the slot attention (remembering its own, for ``use_own``)."""
    if model.config._attn_implementation != NAME:
        model._batchgen_own_attention = model.config._attn_implementation
        model.set_attn_implementation(register())


def use_own(model: Any) -> None:
    """Put the model back on the attention it came with."""
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation(getattr(model, "_batchgen_own_attention", "sdpa"))


def register() -> str:
    """Register ``slot_attention`` under ``NAME`` (once per process) and return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, slot_attention)
        _registered = True
    return NAME
