"""The slot KV cache: per layer, keys and values ``[slots + 1, kv_heads, capacity, head_dim]``.

A slot holds one sequence's keys from position 0. Slots are taken and released by the decoder
(``take``/``release``); the extra last slot is scratch, where the padding rows of a decode step
write, so padding never touches a live sequence. A layer's tensors are allocated on its first
write, shaped from the keys it receives, so any head count, head size or dtype per layer works
without reading the model's config. The prefix of a job (``decoder``) and the prompt of a row
with n samples are copied between slots with ``copy``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from batchgen.engine.graphs import StepGraphs


class SlotCache:
    def __init__(self, slots: int, capacity: int, device: torch.device | str):
        self.slots = slots
        self.capacity = capacity
        self.device = torch.device(device)
        self.scratch = slots  # the padding rows' slot
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._free = list(range(slots - 1, -1, -1))

    # -- slots ---------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def release_all(self) -> None:
        """Every slot free again (a run starts; one that raised may have left slots taken)."""
        self._free = list(range(self.slots - 1, -1, -1))

    # -- storage -------------------------------------------------------------------------

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (keys, values), allocated like ``like`` ([B, kv_heads, T, head_dim])
        on first use."""
        keys = self.keys.get(index)
        if keys is None:
            shape = (self.slots + 1, like.shape[1], self.capacity, like.shape[3])
            keys = self.keys[index] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[index] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return keys, self.values[index]

    def copy(self, source: int, targets: list[int], length: int) -> None:
        """Keys and values of positions [0, length) of slot ``source`` into each of ``targets``."""
        if not targets or length == 0:
            return
        index = torch.tensor(targets, device=self.device)
        for store in (self.keys, self.values):
            for t in store.values():
                t[index, :, :length] = t[source, :, :length]

    def load(self, slot: int, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Positions [0, n) of ``slot`` from ``saved`` (per layer (keys, values) [kv_heads, n,
        head_dim], from ``save``)."""
        for index, (k, v) in saved.items():
            keys, values = self.layer(index, k[None])
            keys[slot, :, : k.shape[1]] = k
            values[slot, :, : v.shape[1]] = v

    def save(self, slot: int, length: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: (self.keys[i][slot, :, :length].clone(), self.values[i][slot, :, :length].clone())
                for i in self.keys}


class SlotState:
    """What the decoder keeps on the device from one run to the next: the slot cache, each
    slot's last token, seed and seen tokens, and the CUDA graphs that point at them. Replaced
    (graphs and all) when a run needs more room or another dtype."""

    def __init__(self, slots: int, capacity: int, device, dtype, vocab: int, penalty: bool,
                 graph_factory: Callable[[], Any] | None, step: Callable):
        self.cache = SlotCache(slots, capacity, device)
        self.dtype = dtype
        self.last_token = torch.zeros(slots + 1, dtype=torch.long, device=device)
        self.seeds = torch.zeros(slots + 1, dtype=torch.long, device=device)
        self.seeds[-1] = -1  # the scratch slot's: padding rows are sampled too, and ignored
        self.seen = (torch.zeros((slots + 1, vocab), dtype=torch.bool, device=device)
                     if penalty else None)
        self.graphs = StepGraphs(step, graph_factory) if graph_factory is not None else None

    def fits(self, slots: int, capacity: int, dtype, penalty: bool) -> bool:
        return (self.cache.slots == slots and self.cache.capacity >= capacity
                and self.dtype == dtype and (self.seen is not None) == penalty)
