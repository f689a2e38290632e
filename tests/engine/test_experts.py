"""Mixture-of-experts models (mixtral, qwen2_moe, olmoe: 4 experts, top-2) on the batch-invariant
experts of ``batchgen.engine.experts``: a row's logits are bitwise the same alone as in mixed
batches, greedy tokens equal transformers' own ``generate``, every expert GEMM sees a multiple
of ``MIN_ROWS`` rows, and the experts' forward equals transformers' within float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from archs import MOE, build
from test_slots import (  # noqa: F401 - one_thread: the autouse fixture, here too
    SAMPLED, Recorder, _invariance, assert_bitwise, hf_greedy, one_thread, upto_eos, zoo_engine,
    zoo_prompts
)

from batchgen.engine import Request
from batchgen.engine.experts import NAME, experts_forward, use_invariant_experts
from batchgen.engine.prefill import MIN_ROWS

# 10 prompts of many lengths: prefills and decode steps route different token counts to each
# expert depending on the neighbours.
LENGTHS = (1, 3, 8, 9, 15, 22, 30, 37, 40, 64)


@pytest.mark.parametrize("arch", MOE)
def test_moe_rows_are_bitwise_independent_of_their_batch(monkeypatch, arch):
    eng = zoo_engine(arch, **SAMPLED)
    assert eng.path == "slots", eng.path_reason
    assert eng.model.config._experts_implementation == NAME
    _invariance(monkeypatch, eng, [Request(p, 50 + i) for i, p in enumerate(zoo_prompts(LENGTHS))])


@pytest.mark.slow  # two threads on a busy box: each GEMM waits for the second thread
@pytest.mark.parametrize("arch", MOE)
def test_moe_rows_are_bitwise_independent_of_their_batch_on_two_threads(monkeypatch, arch):
    eng = zoo_engine(arch, **SAMPLED, max_new_tokens=6)
    torch.set_num_threads(2)  # after the probe
    requests = [Request(p, 70 + i) for i, p in enumerate(zoo_prompts((2, 5, 9, 14, 17, 30)))]
    rec = Recorder(monkeypatch)
    alone = {}
    for r in requests:
        alone.update(rec.run(eng, [r])[1])
    assert_bitwise(rec.run(eng, requests)[1], alone, f"{arch}, 6 rows, 2 threads")


@pytest.mark.parametrize("arch", MOE)
def test_moe_greedy_equals_hf_generate(arch):
    eng = zoo_engine(arch)
    assert eng.path == "slots", eng.path_reason
    prompts = zoo_prompts((1, 5, 9, 20, 33))
    got = eng.generate([Request(p, i) for i, p in enumerate(prompts)])
    own = build(arch)  # transformers' default experts ("grouped_mm"), a row alone
    assert own.config._experts_implementation != NAME
    for p, c in zip(prompts, got):
        assert upto_eos(c.token_ids, eng.eos_ids) == hf_greedy(own, p, 12), len(p)


def test_every_moe_gemm_sees_a_multiple_of_min_rows(monkeypatch):
    """Checked on the shapes (so whatever the threads), on qwen2_moe: router, experts, shared
    expert and its gate. Before the change each expert's group was as large as the tokens that
    neighbours routed to it."""
    eng = zoo_engine("qwen2_moe")
    linear_rows, group_rows = [], []
    linear, grouped_mm = F.linear, F.grouped_mm

    def counting_linear(x, weight, bias=None):
        linear_rows.append(x.shape[:-1].numel())
        return linear(x, weight, bias)

    def counting_grouped_mm(x, weight, offs=None, **kwargs):
        ends = offs.tolist()
        group_rows.extend(b - a for a, b in zip([0] + ends, ends))
        return grouped_mm(x, weight, offs=offs, **kwargs)

    monkeypatch.setattr(F, "linear", counting_linear)
    monkeypatch.setattr(F, "grouped_mm", counting_grouped_mm)
    eng.generate([Request(p, i) for i, p in enumerate(zoo_prompts((3, 7, 12, 25, 31)))])
    assert linear_rows and all(n % MIN_ROWS == 0 for n in linear_rows), sorted(set(linear_rows))
    assert any(group_rows) and all(n % MIN_ROWS == 0 for n in group_rows), sorted(set(group_rows))


def _routing(tokens: int, k: int, experts: int, seed: int):
    """Random top-k routing that leaves expert 0 without tokens, and normalised weights."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts - 1, generator=g)[:k] + 1 for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).softmax(-1)
    return index, weights


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # gpt_oss: biases, transposed weights
def test_experts_forward_equals_transformers_and_a_row_alone(arch):
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts = build(arch).model.layers[0].mlp.experts
    hidden = torch.randn(13, 32, generator=torch.Generator().manual_seed(3))  # hidden_size
    index, weights = _routing(13, 3, experts.num_experts, seed=4)  # top-3: order of the sum
    with torch.no_grad():
        got = experts_forward(experts, hidden, index, weights)
        want = grouped_mm_experts_forward(experts, hidden, index, weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for row in (0, 6, 12):
            alone = experts_forward(experts, hidden[row:row + 1], index[row:row + 1],
                                    weights[row:row + 1])
            assert torch.equal(alone[0], got[row]), row


def test_experts_forward_traces_with_fullgraph():
    """No host sync, static shapes: the proxy for a capturable decode step."""
    experts = build("olmoe").model.layers[0].mlp.experts
    hidden = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    index, weights = _routing(8, 2, experts.num_experts, seed=6)
    with torch.no_grad():
        eager = experts_forward(experts, hidden, index, weights)
        torch._dynamo.reset()
        try:
            traced = torch.compile(experts_forward, fullgraph=True, backend="eager")(
                experts, hidden, index, weights)
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


def test_use_invariant_experts_switches_only_moe_models():
    dense = build("llama")
    assert not use_invariant_experts(dense)
    for arch in MOE:
        model = build(arch)
        assert use_invariant_experts(model), arch
        assert model.config._experts_implementation == NAME
        assert use_invariant_experts(model)  # again: nothing to change
    # gpt_oss's attention goes to the Hugging Face path; its experts are invariant there too.
    eng = zoo_engine("gpt_oss")
    assert eng.path == "hf" and eng.model.config._experts_implementation == NAME
