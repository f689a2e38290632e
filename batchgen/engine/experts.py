"""Batch-invariant experts for mixture-of-experts models: a function registered with
transformers' ``ExpertsInterface`` under ``NAME``, and ``use_invariant_experts`` to put a model
on it (the engine does, at load, for both paths).

transformers routes each token to its top-k experts and runs one GEMM per expert over the tokens
routed to it: the row count of an expert's GEMM depends on which other rows share the call, and
on CPU so do the bits of a row's result (F.linear gives a row the same bits only in GEMMs whose
row count is a multiple of ``MIN_ROWS``). Here each expert's group of rows is padded with zero
rows to a multiple of ``MIN_ROWS``, and a token's k weighted expert outputs are summed in the
order of its routing ranks, so a token's result depends on that token alone. The router, and a
shared expert (Qwen2-MoE and its kin), are linears over every row of the call, which the slot
path pads to a multiple of ``MIN_ROWS`` already; the shared expert's gate gets a strided output
so that the sigmoid after it does not depend on the row count (``_strided_gate``).

Every shape is static (the padded layout is computed on the device: no host sync), and the
GEMMs are transformers' own grouped ones, so a decode step stays capturable in a CUDA graph.
For a row alone the output equals transformers' default ("grouped_mm") up to the GEMM's
row-count bit class: same tokens, logits within float rounding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from batchgen.engine.prefill import MIN_ROWS

log = logging.getLogger("batchgen.engine")

NAME = "batchgen_experts"
_registered = False


def experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward of a ``@use_experts_implementation`` experts module: ``hidden_states``
    (tokens, hidden), ``top_k_index`` / ``top_k_weights`` (tokens, k) -> (tokens, hidden)."""
    from transformers.integrations.moe import _grouped_linear

    tokens, k = top_k_index.shape
    experts, hidden = self.num_experts, hidden_states.shape[-1]
    device = hidden_states.device
    pairs = tokens * k

    # 1. The (token, rank) pairs sorted by expert, stably; each expert's group padded to a
    #    multiple of MIN_ROWS rows in a buffer of a static size (every group padded at most).
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, order = torch.sort(expert_ids, stable=True)
    ids = torch.arange(experts, device=device)
    starts = torch.searchsorted(sorted_ids, ids)
    counts = torch.searchsorted(sorted_ids, ids, right=True) - starts
    padded = (counts + MIN_ROWS - 1) // MIN_ROWS * MIN_ROWS
    ends = padded.cumsum(0)
    rank = torch.arange(pairs, device=device) - starts[sorted_ids]
    rows = ends[sorted_ids] - padded[sorted_ids] + rank  # each sorted pair's row in the buffer
    # A multiple of MIN_ROWS: on 2 or 4 threads, elementwise ops over the buffer (the gate's
    # activation) are split between the threads at row boundaries.
    capacity = -(-(pairs + experts * (MIN_ROWS - 1)) // MIN_ROWS) * MIN_ROWS
    x = hidden_states.new_zeros(capacity, hidden)
    x[rows] = hidden_states[order // k]
    offsets = ends.to(torch.int32)  # rows past offsets[-1] are never computed nor read

    row_expert = None
    if self.has_bias:
        row_expert = torch.bucketize(torch.arange(capacity, device=device), ends, right=True)
        row_expert = row_expert.clamp_(max=experts - 1)

    def linear(inputs: torch.Tensor, name: str) -> torch.Tensor:
        bias = getattr(self, f"{name}_bias")[row_expert] if self.has_bias else None
        return _grouped_linear(inputs, getattr(self, name), offsets, bias=bias,
                               is_transposed=self.is_transposed)

    # 2. Up (and gate), activation, down: one grouped GEMM each.
    if self.has_gate:
        out = self._apply_gate(linear(x, "gate_up_proj"))
    else:
        out = self.act_fn(linear(x, "up_proj"))
    out = linear(out, "down_proj")
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)

    # 3. Back to (token, rank) order; weighted, and summed over the ranks in a fixed order.
    per_pair = out.new_empty(pairs, out.shape[-1])
    per_pair[order] = out[rows]
    weighted = per_pair.view(tokens, k, -1) * top_k_weights.unsqueeze(-1)
    total = weighted[:, 0]
    for r in range(1, k):
        total = total + weighted[:, r]
    return total.to(hidden_states.dtype)


def register() -> str:
    """Register ``experts_forward`` under ``NAME`` (once per process) and return the name."""
    global _registered
    if not _registered:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(NAME, experts_forward)
        _registered = True
    return NAME


def _experts_modules(model: Any) -> list[Any]:
    """The modules whose forward ``@use_experts_implementation`` dispatches."""
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")
            and hasattr(m, "_apply_gate")]


def _servable(module: Any) -> bool:
    """Plain 3-D expert weights (not quantized, not split across ranks)."""
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    weights = [getattr(module, n, None) for n in names]
    return (not getattr(module, "_is_expert_parallel", False)
            and isinstance(getattr(module, "num_experts", None), int)
            and all(isinstance(w, torch.Tensor) and w.dim() == 3 and w.is_floating_point()
                    for w in weights))


def _strided_gate(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    """A shared expert's gate (hidden -> 1), returned as a column of a wider buffer. The block
    applies a sigmoid to it next: on CPU the sigmoid of a contiguous tensor takes a scalar path
    with other bits for its last (numel % 32) elements, i.e. for rows chosen by the row count;
    over a strided input it takes the scalar path for every element."""
    wide = output.new_empty(*output.shape[:-1], 2)
    wide[..., :1] = output
    return wide[..., :1]


def _hook_shared_gates(model: Any) -> None:
    for name, m in model.named_modules():
        if (name.endswith("shared_expert_gate") and isinstance(m, torch.nn.Linear)
                and m.out_features == 1 and not getattr(m, "_batchgen_strided", False)):
            m.register_forward_hook(_strided_gate)
            m._batchgen_strided = True


def use_invariant_experts(model: Any) -> bool:
    """Put ``model``'s experts on ``NAME`` (and a shared expert's gate on a strided output);
    True if it has experts and now runs them there. A model whose experts this cannot run
    (quantized, expert-parallel) is left as it is, logged."""
    modules = _experts_modules(model)
    if not modules:
        return False
    _hook_shared_gates(model)
    try:  # transformers' grouped GEMM, which ``experts_forward`` runs (not in every release)
        from transformers.integrations.moe import _grouped_linear  # noqa: F401
    except ImportError:
        log.warning("batchgen: %s keeps its own experts (this transformers has no grouped "
                    "expert GEMM to pad): its rows may depend on their batch", type(model).__name__)
        return False
    if not all(_servable(m) for m in modules):
        log.warning("batchgen: %s keeps its own experts (quantized or expert-parallel weights): "
                    "its rows may depend on their batch", type(model).__name__)
        return False
    try:
        model.set_experts_implementation(register())
    except (ValueError, KeyError, RuntimeError) as e:
        log.warning("batchgen: %s keeps its own experts (%s): its rows may depend on their batch",
                    type(model).__name__, e)
        return False
    switched = [m.config._experts_implementation == NAME for m in modules]
    if not all(switched):
        log.warning("batchgen: %s: %d of %d experts modules run on %s, the rest keep their own "
                    "(their rows may depend on their batch)", type(model).__name__, sum(switched),
                    len(switched), NAME)
    return all(switched)
