"""Rotary embeddings per row, for models whose rotary frequencies depend on the sequence length.

transformers' ``dynamic_rope_update`` picks a longrope model's factors (short or long) and a
dynamic-NTK model's base per forward pass, from the pass's largest position, and dynamic NTK
keeps what it grew from one call to the next. The slot path runs many rows in one pass (a packed
prefill, a decode step), so a row would get its neighbours' frequencies. ``use_row_rotary`` wraps
such a model's rotary modules; while ``SlotModel.hidden`` runs the model (``bind_rows``), each
token gets the frequencies its row gets from Hugging Face alone: a prompt's tokens those of the
prompt's length, a decode token those of its own position + 1; dynamic NTK's as a pure function
of that length (no state kept from earlier calls). Outside it the module is its own (the Hugging
Face path, the probe's reference). Models whose rotary ignores the length are left alone.

The frequencies come from transformers' own rope functions, called as ``dynamic_rope_update``
calls them, and the cos/sin from the module's own undecorated forward, given one row of
frequencies per token: a row's bits are Hugging Face's alone. Longrope chooses on the device (a
decode step stays capturable); dynamic NTK reads the rows' lengths on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from batchgen.engine.attention import Prefill, Unsupported

ATTR = "_batchgen_row_rotary"  # the model's RowRotary wrappers


def _length_dependent(rope_type: Any) -> bool:
    # as ``dynamic_rope_update`` decides which pass-dependent update to make
    return isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope")


def _rope_types(module: Any) -> list:
    types = getattr(module, "rope_type", None)
    return list(types.values()) if isinstance(types, dict) else [types]


def use_row_rotary(model: Any) -> bool:
    """Wrap each rotary module of ``model`` whose frequencies depend on the length (once).
    True when there is one: then the job prefix is off (``by_length``)."""
    wrapped = getattr(model, ATTR, None)
    if wrapped is None:
        wrapped = [RowRotary(m) for m in model.modules()
                   if hasattr(m, "config") and any(map(_length_dependent, _rope_types(m)))]
        setattr(model, ATTR, wrapped)
    return bool(wrapped)


def by_length(model: Any) -> bool:
    """Whether ``model``'s rotary frequencies depend on the sequence length (wrapped)."""
    return bool(getattr(model, ATTR, None))


def reference_lengths(positions: torch.Tensor, step: Any) -> torch.Tensor:
    """The length whose frequencies each token takes ([B, T] like ``positions``): in a packed
    prefill the row's largest position + 1 (its prompt's length), in a decode step the
    token's position + 1."""
    lengths = positions + 1
    if isinstance(step, Prefill):
        lengths = lengths.clone()
        for seg in step.segments:
            rows, width = seg.slots.shape[0], seg.width
            span = slice(seg.start, seg.start + rows * width)
            longest = lengths[0, span].reshape(rows, width).amax(1, keepdim=True)
            lengths[0, span] = longest.expand(rows, width).reshape(-1)
    return lengths


class bind_rows:
    """``with bind_rows(model, positions, step):`` the model's wrapped rotary modules give each
    token the frequencies of its row (``reference_lengths``). Nothing for other models."""

    def __init__(self, model: Any, positions: torch.Tensor, step: Any):
        self.wrapped = getattr(model, ATTR, None) or []
        if self.wrapped:
            lengths = reference_lengths(positions, step)
            for w in self.wrapped:
                w.lengths = lengths

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        for w in self.wrapped:
            w.lengths = None


class RowRotary:
    """One rotary module's forward, per row while bound, the module's own otherwise."""

    def __init__(self, module: Any):
        self.module = module
        self.own = module.forward  # dynamic_rope_update's wrapper around the raw forward
        self.raw = getattr(type(module).forward, "__wrapped__", None)
        self.lengths: torch.Tensor | None = None  # [B, T] per token, while bound
        self._freqs: dict[tuple, torch.Tensor] = {}  # inverse frequencies: a pure function
        module.forward = self.forward

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        m = self.module
        rope_type = m.rope_type if layer_type is None else m.rope_type[layer_type]
        if self.lengths is None or not _length_dependent(rope_type):
            return self.own(x, position_ids, **kwargs)
        if self.raw is None or self.lengths.shape != position_ids.shape:
            raise Unsupported(f"a {rope_type} rotary embedding the slot path cannot apply per row "
                              f"({type(m).__name__})")
        prefix = "" if layer_type is None else f"{layer_type}_"
        if rope_type == "longrope":
            inv = self._longrope(prefix, layer_type, x.device)
        else:
            inv = self._dynamic(rope_type, prefix, layer_type, x.device)
        # The module's own forward over one row of frequencies per token ([B, T, dim / 2]
        # broadcasts where [dim / 2] did): its multiplies, cat, cos, sin and scaling.
        name = f"{prefix}inv_freq"
        where = m._buffers if name in m._buffers else m.__dict__
        own = where[name]
        where[name] = inv
        try:
            return self.raw(m, x, position_ids, **kwargs)
        finally:
            where[name] = own

    def _longrope(self, prefix: str, layer_type: str | None, device) -> torch.Tensor:
        m = self.module
        params = m.config.rope_parameters
        boundary = (params if layer_type is None else params[layer_type])[
            "original_max_position_embeddings"]
        key = (layer_type, "long", device)
        long = self._freqs.get(key)
        if long is None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            long = self._freqs[key] = ROPE_INIT_FUNCTIONS["longrope"](
                m.config, device, seq_len=boundary + 1, layer_type=layer_type)[0].to(device)
        short = getattr(m, f"{prefix}original_inv_freq").to(device)
        # Hugging Face copies its choice into the module's buffer, in that buffer's dtype
        dtype = getattr(m, f"{prefix}inv_freq").dtype
        return torch.where((self.lengths > boundary)[..., None], long, short).to(dtype)

    def _dynamic(self, rope_type: str, prefix: str, layer_type: str | None, device
                 ) -> torch.Tensor:
        """Hugging Face alone grows the base at every length past ``original_max_seq_len``
        (a fresh module: the original frequencies up to it): one row per length seen."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        m = self.module
        boundary = m.original_max_seq_len
        lengths = self.lengths.clamp(min=boundary)
        points = sorted({boundary, *lengths.flatten().tolist()})  # a host sync: runs eagerly
        rows = [getattr(m, f"{prefix}original_inv_freq").to(device)]
        for n in points[1:]:
            key = (layer_type, n, device)
            if key not in self._freqs:  # seq_len as the 0-d tensor Hugging Face passes
                self._freqs[key] = ROPE_INIT_FUNCTIONS[rope_type](
                    m.config, device, seq_len=torch.tensor(n, device=device),
                    layer_type=layer_type)[0]
            rows.append(self._freqs[key])
        index = torch.searchsorted(torch.tensor(points, device=device), lengths)
        return torch.stack(rows)[index]
