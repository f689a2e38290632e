"""CUDA graph bookkeeping, on CPU: everything but the GPU itself.

``StepGraphs`` takes a ``graph_factory``; ``ReplayByCall`` stands in for ``torch.cuda.CUDAGraph``
with the same contract (``warm`` runs the step, ``capture`` runs nothing and hands back static
outputs, ``replay`` fills them from the static inputs), so the static-buffer discipline, the
shape keys, the first-call eager run and the fallback on a failed capture are tested here; the
decoder's graphed step (one key length per step, rows in buckets) runs on the tiny model.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from batchgen.engine import Engine, Request
from batchgen.engine.graphs import StepGraphs, graph_rows
from batchgen.engine.loading import load_tokenizer
from batchgen.spec import GenerationSpec, ModelSpec


class ReplayByCall:
    """A CUDA graph's contract without a GPU: capture records, replay runs on static inputs."""

    made: list[ReplayByCall] = []

    def __init__(self):
        self.fn = None
        self.out: dict[str, torch.Tensor] = {}
        self.replays = 0
        ReplayByCall.made.append(self)

    def warm(self, fn):
        return fn()

    def capture(self, fn, pool):
        self.fn = fn
        return self.out

    def replay(self):
        self.replays += 1
        self.out.update(self.fn())


class FailingCapture(ReplayByCall):
    def capture(self, fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")


def counting_step():
    calls = []

    def step(key, inputs):
        calls.append(key)
        return {"y": inputs["x"] * key + 1}

    return step, calls


def test_the_first_call_of_a_shape_runs_eagerly_and_later_calls_replay_static_buffers():
    step, calls = counting_step()
    graphs = StepGraphs(step, ReplayByCall)
    x = torch.arange(4.0)
    assert torch.equal(graphs(2, {"x": x})["y"], x * 2 + 1)
    assert calls == [2]  # one eager run; the capture ran nothing
    y = graphs(2, {"x": x + 10})["y"]  # new values copied into the static input
    assert torch.equal(y, (x + 10) * 2 + 1) and calls == [2, 2]
    assert torch.equal(graphs(3, {"x": x})["y"], x * 3 + 1)  # another shape: another graph
    assert sorted(graphs.graphs) == [2, 3] and graphs.replays == 1


def test_a_failed_capture_turns_graphs_off_and_the_step_runs_once(caplog):
    step, calls = counting_step()
    graphs = StepGraphs(step, FailingCapture)
    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="batchgen.engine"):
        assert torch.equal(graphs(2, {"x": x})["y"], x * 2 + 1)
    assert calls == [2] and not graphs.enabled and "stream is capturing" in graphs.failure
    assert "capture failed, decoding eagerly" in caplog.text
    assert torch.equal(graphs(2, {"x": x})["y"], x * 2 + 1) and calls == [2, 2]


def test_an_error_in_the_step_itself_is_the_steps_not_a_capture_failure():
    def step(key, inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    graphs = StepGraphs(step, ReplayByCall)
    with pytest.raises(torch.OutOfMemoryError):
        graphs(1, {"x": torch.zeros(1)})
    assert graphs.enabled  # the back-off handles memory; graphs stay on


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ModelSpec(path=tiny_model))
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), tok


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95,
                                            "repetition_penalty": 1.2}], ids=["greedy", "sampled"])
def test_graphed_decode_steps_give_the_eager_tokens(tiny, sampling):
    """The graphed step (one key length for the step, rows in buckets of 4, 8, 16, ...) gives
    the tokens of the eager step (a key length per row), replaying captured graphs."""
    model, tok = tiny
    texts = ["The cat", "Write one sentence about tea.", "<|user|>\nWrite one sentence about "
             "rivers.<|end|>\n<|assistant|>\n", "A robot builds a quiet garden. " * 5] * 3
    requests = [Request(tuple(ids), 7 + i) for i, ids in enumerate(tok(texts)["input_ids"])]
    gen = GenerationSpec(max_new_tokens=20, **sampling)
    eager = Engine(model, tok, gen, max_input_tokens=None, batch_size=6)
    want = [c.token_ids for c in eager.generate(requests)]
    graphed = Engine(model, tok, gen, max_input_tokens=None, batch_size=6)
    graphed.graph_factory = ReplayByCall
    ReplayByCall.made = []
    got = [c.token_ids for c in graphed.generate(requests)]
    assert got == want
    graphs = graphed.graphs
    assert graphs is not None and graphs.enabled and graphs.replays > 0
    assert {rows for rows, *_ in graphs.graphs} <= {graph_rows(n) for n in range(1, 7)}
    assert sum(g.replays for g in ReplayByCall.made) == graphs.replays
    # a second run reuses the state and its graphs: no new capture for known shapes
    captured = len(graphs.graphs)
    assert [c.token_ids for c in graphed.generate(requests)] == want
    assert graphed.graphs is graphs and len(graphs.graphs) == captured


def test_graph_rows_buckets():
    assert [graph_rows(n) for n in (1, 4, 5, 8, 9, 16, 17, 250)] == [4, 4, 8, 8, 16, 16, 32, 256]


def test_graphed_steps_with_constraints_and_logprobs_give_the_eager_outputs(tiny):
    """The constraint's bitmask is one more graph input, the logprobs more graph outputs: the
    graphed step gives the eager tokens and logprobs (constrained rows next to unconstrained
    ones, whose bitmask allows every token)."""
    from batchgen.spec import StructuredSpec
    from batchgen.spec.constraints import constraint_for

    model, tok = tiny
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"type": "string", "maxLength": 12}}}
    constraint = constraint_for(StructuredSpec(json_schema=schema))
    texts = ["The cat", "Write one sentence about tea.", "A robot builds a quiet garden. " * 3]
    requests = [Request(tuple(ids), 3 + i, constraint if i % 2 == 0 else None)
                for i, ids in enumerate(tok(texts * 2)["input_ids"])]
    gen = GenerationSpec(max_new_tokens=24, temperature=0.8, logprobs=2)
    eager = Engine(model, tok, gen, max_input_tokens=None, batch_size=6).generate(requests)
    graphed = Engine(model, tok, gen, max_input_tokens=None, batch_size=6)
    graphed.graph_factory = ReplayByCall
    ReplayByCall.made = []
    got = graphed.generate(requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
    assert [c.logprobs for c in got] == [c.logprobs for c in eager]
    assert graphed.graphs.replays > 0 and {True} <= {key[2] for key in graphed.graphs.graphs}
    for i in (0, 2, 4):
        assert got[i].truncated or json.loads(got[i].text).keys() == {"a"}
