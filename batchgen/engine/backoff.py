"""Back-off: what the engine does when a batch fails in a way a smaller batch may cure.

A batch that runs out of memory (CUDA or CPU), or whose logits turn NaN/+inf (fp16 overflow), is
split in halves and each half run again; a single request that still fails goes to the caller's
``alone`` (the engine retries non-finite logits once with the weights in float32, else returns
an error completion). Per-request seeds make the split invisible in the outputs. Any other error
propagates.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from batchgen.engine.completions import EngineStats
from batchgen.errors import one_line


class NonFiniteLogits(RuntimeError):
    """NaN or +inf in the logits: the model overflowed in its dtype."""


def check_finite(logits: torch.Tensor) -> torch.Tensor:
    """``logits``, or NonFiniteLogits if any is NaN or +inf (a host sync: not in decode steps,
    which flag rows instead)."""
    if (logits.isnan() | logits.isposinf()).any():
        raise NonFiniteLogits("the model produced NaN/inf logits")
    return logits


def run_or_split(requests: list, run: Callable[[list], list], alone: Callable[[list, str, bool], list],
                 stats: EngineStats) -> list:
    """``run(requests)``; a batch that runs out of memory or goes non-finite is split in
    halves and each half run again; a single request that still fails goes to
    ``alone(requests, problem, non_finite)``. Any other error propagates."""
    try:
        return run(requests)
    except (RuntimeError, MemoryError) as e:
        problem, non_finite = failure(e), isinstance(e, NonFiniteLogits)
    free_memory()
    if len(requests) > 1:
        stats.splits += 1
        half = halve(requests)
        return (run_or_split(requests[:half], run, alone, stats)
                + run_or_split(requests[half:], run, alone, stats))
    return alone(requests, problem, non_finite)


@contextmanager
def in_float32(model: Any):
    """Parameters upcast to float32 for the block, then restored (fp16/bf16 -> fp32 -> back
    is exact). Buffers are left alone: some are float32 on purpose (RoPE ``inv_freq``), and
    a blanket ``model.to(dtype)`` on the way back would round them. An out-of-memory
    half-way through the upcast restores what was already upcast."""
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    dtypes = [p.dtype for p in params]
    done = 0
    try:
        for p in params:
            p.data = p.data.float()
            done += 1
        yield
    finally:
        for p, dtype in zip(params[:done], dtypes):
            p.data = p.data.to(dtype)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure(e: BaseException) -> str:
    """What made a batch fail in a way splitting it may cure (non-finite logits, out of
    memory); any other error is raised again."""
    if isinstance(e, NonFiniteLogits):
        return str(e)
    if isinstance(e, MemoryError) or is_oom(e):
        return f"out of memory: {one_line(e, 200)}"
    raise e


def halve(requests: list) -> int:
    """Where to cut a failing batch in two: at the middle, moved so that the samples of one
    prompt stay together (they share a prefill)."""
    half = len(requests) // 2
    for cut in sorted(range(1, len(requests)), key=lambda c: abs(c - half)):
        if requests[cut].prompt_ids != requests[cut - 1].prompt_ids:
            return cut
    return half
