"""Packed prefills over the slot cache: the model calls of the slot path.

A prompt that starts with the job's prefix (the tokens every rendering of the job's prompt starts
with) is prefilled as prefix + suffix: the prefix's keys, computed once per replica and dtype,
are copied into the prompt's slot and only the suffix is computed. The prompts prefilled
together go through the model as one packed sequence (batch 1), in segments of one
(split, width) shape each, attention per segment. A prompt's split and width depend on the
prompt alone, never on the batch: widths are the suffix length rounded up to ``PREFILL_BLOCK``,
and every GEMM, the LM head's too, sees a multiple of ``MIN_ROWS`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from batchgen.engine.attention import KEY_BLOCK, KWARG, Prefill, Segment
from batchgen.engine.rotary import bind_rows
from batchgen.engine.slots import SlotState

PREFILL_BLOCK = 8  # prefill widths: the prompt (or suffix) length rounded up to this
# F.linear on CPU (fp32, MKL) gives a row the same bits in any GEMM whose row count is a multiple
# of 4; with 2+ threads, other counts >= 4 differ too (5-7 and 9-11 on 2 threads, 17-19 on 16):
# rows are padded to a multiple of MIN_ROWS, not just to MIN_ROWS.
MIN_ROWS = 4


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass
class DecodeStats:
    prefill_positions: int = 0  # prompt positions computed, padding included
    prefix_positions: int = 0  # of which for the job prefix
    steps: int = 0
    row_steps: int = 0  # live rows summed over decode steps
    slot_steps: int = 0  # slots summed over decode steps
    busy_row_steps: int = 0  # the same two, only while requests were waiting
    busy_slot_steps: int = 0


# EngineStats field -> the DecodeStats field it sums over a replica's runs.
ENGINE_COUNTERS = {"padded_prompt_positions": "prefill_positions",
                   "prefix_positions": "prefix_positions", "decode_steps": "steps",
                   "row_steps": "row_steps", "slot_steps": "slot_steps",
                   "busy_row_steps": "busy_row_steps", "busy_slot_steps": "busy_slot_steps"}


class SlotModel:
    """The slot path's model calls, over the device state it holds: packed prefills of prompts
    after the job prefix (whose keys are computed once), and the LM head. ``SlotDecoder`` adds
    the decode loop; scoring uses these alone. ``graph_step``: the decode step CUDA graphs
    capture (with ``graph_factory``)."""

    def __init__(self, model: Any, gen: Any, *, pad_id: int, slots: int, max_batch_tokens: int,
                 prefix: tuple[int, ...] = (), prefix_kv: dict | None = None,
                 state: dict | None = None, graph_factory: Callable[[], Any] | None = None,
                 graph_step: Callable | None = None):
        self.model = model
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.gen = gen
        self.pad_id = pad_id
        self.slots = slots
        self.max_batch_tokens = max_batch_tokens
        self.prefix = tuple(prefix)
        self.device = next(model.parameters()).device
        self.stats = DecodeStats()
        # The prefix's keys per dtype; the engine passes one dict to all its decoders.
        self._prefix_kv: dict[torch.dtype, dict] = {} if prefix_kv is None else prefix_kv
        self.layers_seen: set[int] = set()  # layers that called the slot attention (probe)
        # The device state, kept by the engine across runs in this dict ("slots" key).
        self._state = {} if state is None else state
        self.graph_factory = graph_factory if graph_step is not None else None
        self._graph_step_fn = graph_step

    def split(self, prompt: tuple[int, ...]) -> int:
        """Tokens of ``prompt`` taken from the job prefix: all of it or nothing."""
        p = len(self.prefix)
        return p if p and len(prompt) > p and prompt[:p] == self.prefix else 0

    def shape(self, prompt: tuple[int, ...]) -> tuple[int, int]:
        """(split, width) of the prompt's prefill: keys taken from the prefix, then the suffix
        rounded up to PREFILL_BLOCK. A function of the prompt alone."""
        s = self.split(prompt)
        return s, round_up(len(prompt) - s, PREFILL_BLOCK)

    def hold(self, lengths: list[int]) -> None:
        """Take the kept device state, or make a new one, with room for keys of ``lengths``
        (and the prefix's prefill); every slot free. Never more slots than the batch size, nor
        than the token budget holds at this capacity, whatever the prompts."""
        capacity = round_up(max(round_up(len(self.prefix), PREFILL_BLOCK), *lengths), KEY_BLOCK)
        held = self._state.get("slots")
        if held is not None:  # the capacity only grows: a kept state is not replaced for less
            capacity = max(capacity, held.cache.capacity)
        slots = min(self.slots, max(1, self.max_batch_tokens // capacity))
        dtype = next(self.model.parameters()).dtype
        penalty = self.gen.repetition_penalty != 1.0
        if held is None or not held.fits(slots, capacity, dtype, penalty):
            held = self._state["slots"] = None  # free the old cache before the new one
            vocab = self.head.weight.shape[0]
            held = self._state["slots"] = SlotState(
                slots, capacity, self.device, dtype, vocab, penalty, self.graph_factory,
                self._graph_step_fn)
        self.state = held
        held.cache.release_all()
        self.cache, self.last_token, self.seeds = held.cache, held.last_token, held.seeds
        self.seen = held.seen

    def forward(self, items) -> tuple[torch.Tensor, list[int]]:
        """One packed forward of ``items`` ((offset, width), tokens, slot): each item's tokens
        after ``offset`` (the prefix's keys are loaded into its slot) in a segment of
        ``width``. Returns the hidden states [total, hidden] and where each item starts."""
        dev = self.device
        total = sum(width for (_, width), _, _ in items)
        ids = torch.full((1, total), self.pad_id, dtype=torch.long)
        positions = torch.empty((1, total), dtype=torch.long)
        starts, segments, start = [], [], 0
        for (offset, width), tokens, slot in items:
            suffix = tokens[offset:]
            ids[0, start:start + len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            positions[0, start:start + width] = offset + torch.arange(width).clamp(
                max=len(suffix) - 1)
            starts.append(start)
            if segments and (segments[-1][0], segments[-1][1]) == (offset, width):
                segments[-1][3].append(slot)
            else:
                segments.append((offset, width, start, [slot]))
            if offset:
                self.cache.load(slot, self.prefix_keys())
            start += width
        step = Prefill(self.cache, [Segment(torch.tensor(slots, device=dev), offset, width, at)
                                    for offset, width, at, slots in segments])
        hidden = self.hidden(ids.to(dev), positions.to(dev), step)
        self.stats.prefill_positions += total
        return hidden[0], starts

    def prefix_keys(self) -> dict:
        """The job prefix's keys and values, computed once per dtype (in the scratch slot)."""
        dtype = next(self.model.parameters()).dtype
        saved = self._prefix_kv.get(dtype)
        if saved is None:
            p = len(self.prefix)
            width = round_up(p, PREFILL_BLOCK)
            ids = torch.full((1, width), self.pad_id, dtype=torch.long)
            ids[0, :p] = torch.tensor(self.prefix, dtype=torch.long)
            positions = torch.arange(width).clamp(max=p - 1)[None]
            scratch = self.cache.scratch
            step = Prefill(self.cache, [Segment(torch.tensor([scratch], device=self.device), 0,
                                                width, 0)])
            self.hidden(ids.to(self.device), positions.to(self.device), step)
            saved = self._prefix_kv[dtype] = self.cache.save(scratch, p)
            self.stats.prefill_positions += width
            self.stats.prefix_positions += width
        return saved

    # -- the model -----------------------------------------------------------------------

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        with bind_rows(self.model, positions, step):  # a length-dependent rotary: per row
            out = self.base(input_ids=ids, position_ids=positions, use_cache=False,
                            **{KWARG: step})
        self.layers_seen |= step.layers_seen
        return out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over a multiple of MIN_ROWS rows (bitwise stable per row), float32."""
        n = hidden.shape[0]
        if n % MIN_ROWS:
            hidden = torch.cat([hidden, hidden[:1].expand(round_up(n, MIN_ROWS) - n, -1)])
        return self.head(hidden)[:n].float()
