"""CUDA graphs for decode steps: one graph per shape key, captured lazily into one memory pool.

``StepGraphs(step)`` wraps a decode-step function ``step(key, inputs) -> outputs`` (dicts of
tensors, no host sync inside). The first call with a new ``key`` (the step's static shape: rows bucket
and key length) runs the step eagerly on a side stream — that run is this call's result, and
warms up lazy allocations — then captures it without running it; later calls copy the inputs
into the graph's static buffers and replay it: one launch instead of hundreds. The step may
write state outside its outputs (the KV cache, the last tokens): it runs exactly once per call
either way. Outputs of a replay are the graph's static tensors, overwritten by the next replay
of that key: read or copy them before then (a copy queued before the next replay is safe).

A capture that fails (an op that syncs with the host, a model whose forward branches on tensor
values) turns graphs off for this object, logged once, and the step runs eagerly from then on:
never fatal. ``graph_factory`` is the seam that tests use to run the same bookkeeping on CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from batchgen.errors import one_line

log = logging.getLogger("batchgen.engine")

Tensors = dict[str, torch.Tensor]

GRAPH_KEY_BLOCK = 256  # with CUDA graphs, the step's key length is rounded up to this


def graph_rows(n: int) -> int:
    """Rows of a graphed decode step for n live rows: 4, 8, then multiples of 16 (one graph
    each, as nano-vllm buckets them)."""
    return 4 if n <= 4 else 8 if n <= 8 else -(-n // 16) * 16


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls StepGraphs needs."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = None

    def warm(self, fn: Callable[[], Tensors]) -> Tensors:
        """One eager run on a side stream: lazy allocations happen outside the capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[], Tensors], pool: Any) -> Tensors:
        """Record ``fn`` (nothing runs) and return its static outputs."""
        with torch.cuda.graph(self.graph, pool=pool):
            out = fn()
        self.pool = self.graph.pool()
        return out

    def replay(self) -> None:
        self.graph.replay()


class StepGraphs:
    def __init__(self, step: Callable[[Any, Tensors], Tensors],
                 graph_factory: Callable[[], Any] = CudaGraph):
        self.step = step
        self.graph_factory = graph_factory
        self.enabled = True
        self.failure: str | None = None
        self.graphs: dict[Any, tuple[Any, Tensors, Tensors]] = {}
        self.pool: Any = None
        self.capture_seconds = 0.0
        self.replays = 0

    def __call__(self, key: Any, inputs: Tensors) -> Tensors:
        if not self.enabled:
            return self.step(key, inputs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, inputs)
        graph, static_in, static_out = entry
        for name, value in inputs.items():
            static_in[name].copy_(value)
        graph.replay()
        self.replays += 1
        return static_out

    def _capture(self, key: Any, inputs: Tensors) -> Tensors:
        """This call's step, run eagerly (errors in it propagate: they are the step's), then
        captured for the next calls with this key."""
        started = time.perf_counter()
        static_in = {name: value.clone() for name, value in inputs.items()}
        graph = self.graph_factory()
        eager = graph.warm(lambda: self.step(key, static_in))
        try:
            static_out = graph.capture(lambda: self.step(key, static_in), self.pool)
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly, never fail
            self.enabled = False
            self.failure = f"{type(e).__name__}: {one_line(str(e), 200)}"
            self.graphs.clear()
            log.warning("batchgen: CUDA graph capture failed, decoding eagerly: %s", self.failure)
            return eager
        self.pool = getattr(graph, "pool", None) or self.pool
        self.capture_seconds += time.perf_counter() - started
        self.graphs[key] = (graph, static_in, static_out)
        return eager
