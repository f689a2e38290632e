"""The Hugging Face path (``hfdecode``): a row's tokens and logits do not depend on its batch.

The architectures here are the ones the slot path refuses (``test_slots.NOT_SERVED``): gemma2
(softcapping, sliding window), granite (logit scaling outside the head) and bloom (ALiBi, its own
attention, multi-head). Bitwise claims are checked on the logits each token was chosen from
(``Recorder``), for a row alone and in mixed batches of differing prompt lengths.
"""

from __future__ import annotations

import pytest
import torch
from archs import EOS, VOCAB
from test_slots import (
    SAMPLED, Recorder, assert_bitwise, hf_greedy, upto_eos, zoo_engine, zoo_prompts
)

from batchgen.engine import Request
from batchgen.engine.hfdecode import WIDTH_BLOCK, invariance, prompt_width
from batchgen.engine.prefill import MIN_ROWS

ARCHS = ["gemma2", "granite", "bloom"]
# Prompt lengths crossing several width blocks; equal lengths too.
LENGTHS = (1, 3, 8, 9, 15, 16, 22, 30, 37, 40, 40, 64)
STOPS = {EOS, *range(5, VOCAB, 9)}  # "end of sequence" tokens: rows stop at different steps


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _requests(lengths=LENGTHS, seed=50) -> list[Request]:
    return [Request(p, seed + i) for i, p in enumerate(zoo_prompts(lengths))]


def _alone(rec, eng, requests):
    tokens, logits = {}, {}
    for r in requests:
        out, got = rec.run(eng, [r])
        tokens[r.seed] = out[0].token_ids
        logits.update(got)
    return tokens, logits


def _check_mixes(rec, eng, requests, tokens, alone, what):
    """All requests in batches of 8, then a reversed subset among fillers in batches of 3."""
    eng.batch_size = 8
    out, mixed = rec.run(eng, requests)
    assert_bitwise(mixed, alone, f"{what}: all, batches of 8")
    assert [c.token_ids for c in out] == [tokens[r.seed] for r in requests]
    some = requests[::-2]
    fillers = [Request(r.prompt_ids[: max(1, len(r.prompt_ids) // 2 + 3)], 10_000 + i)
               for i, r in enumerate(requests[1::2])]
    eng.batch_size = 3
    out, mixed = rec.run(eng, fillers[:3] + some + fillers[3:])
    seeds = {r.seed for r in some}
    assert_bitwise(mixed, {k: v for k, v in alone.items() if k[0] in seeds},
                   f"{what}: some among fillers, batches of 3")
    assert [c.token_ids for c in out[3:3 + len(some)]] == [tokens[r.seed] for r in some]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_hf_rows_are_bitwise_independent_of_their_batch(monkeypatch, arch, sampling):
    eng = zoo_engine(arch, **(SAMPLED if sampling else {}))
    assert eng.path == "hf", arch
    eng.eos_ids = STOPS  # rows finish at many different steps
    requests = _requests()
    rec = Recorder(monkeypatch)
    tokens, alone = _alone(rec, eng, requests)
    assert len({len(t) for t in tokens.values()}) > 3, tokens
    _check_mixes(rec, eng, requests, tokens, alone, arch)
    if not sampling:  # a row alone still decodes what plain generate does, up to its stop
        for r in requests:
            want = hf_greedy(eng.model, r.prompt_ids, 12)
            assert tokens[r.seed] == upto_eos(want, STOPS)[:12], (arch, len(r.prompt_ids))


@pytest.mark.slow  # two threads on a busy box: each GEMM waits for the second thread
@pytest.mark.parametrize("arch", ["granite", "gemma2"])  # the model's own sdpa; its own eager
def test_hf_rows_are_bitwise_independent_of_their_batch_on_two_threads(monkeypatch, arch):
    """On 2+ threads CPU SDPA (few queries per head) and eager attention's batched matmuls
    give a row other bits depending on its place in the call: the attention runs row by row
    (``per_row_attention``), and the model gets its own attention back after the run."""
    eng = zoo_engine(arch, **SAMPLED, max_new_tokens=6)
    own = eng.model.config._attn_implementation
    eng.eos_ids = STOPS
    torch.set_num_threads(2)  # after the probe
    assert invariance(eng.model) == (True, "")
    requests = _requests((3, 16, 30, 37, 40, 40, 47))
    rec = Recorder(monkeypatch)
    tokens, alone = _alone(rec, eng, requests)
    eng.batch_size = 8
    out, mixed = rec.run(eng, requests)
    assert_bitwise(mixed, alone, f"{arch}, 2 threads")
    assert [c.token_ids for c in out] == [tokens[r.seed] for r in requests]
    assert eng.model.config._attn_implementation == own


@pytest.mark.parametrize("arch", ["granite", "bloom"])
def test_every_hf_gemm_sees_a_multiple_of_min_rows(arch):
    """Checked on the shapes, so whatever the threads: prefill (rows x width), the LM head
    over the last MIN_ROWS positions, decode steps padded and shrunk in multiples of
    MIN_ROWS while rows finish at different steps."""
    eng = zoo_engine(arch, batch_size=8, max_new_tokens=12)
    eng.eos_ids = STOPS
    rows = []
    hooks = [m.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
             for m in eng.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        out = eng.generate(_requests((1, 3, 5, 7, 9, 11, 13, 20, 22, 40)))
    finally:
        for h in hooks:
            h.remove()
    assert len({c.generated_tokens for c in out}) > 3  # rows left at different steps
    assert rows and all(n % MIN_ROWS == 0 for n in rows), sorted(set(rows))
    assert min(rows) == MIN_ROWS  # a batch shrank to its last live rows


def test_batches_are_cut_within_one_prompt_width():
    eng = zoo_engine("granite", batch_size=3, max_new_tokens=10)
    eng.max_batch_tokens = 150
    lengths = [1, 15, 16, 31, 90, 2, 3, 4, 40, 47, 14, 5]
    batches = eng.plan_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # widest first
    for b in batches:
        widths = {prompt_width(lengths[i]) for i in b}
        assert len(widths) == 1 and len(b) <= 3
        assert len(b) == 1 or len(b) * (widths.pop() + 10) <= 150
    assert [lengths[i] for i in batches[1]] == [40, 47]  # width 48: 2 x 58 <= 150 < 3 x 58
    assert prompt_width(15) == prompt_width(1) == WIDTH_BLOCK < prompt_width(16)


def test_invariance_names_what_this_path_cannot_keep():
    from archs import build

    granite, falcon = build("granite"), build("falcon")
    assert invariance(granite) == invariance(falcon) == (True, "")  # one thread
    torch.set_num_threads(2)
    assert invariance(granite) == (True, "")
    ok, why = invariance(falcon)  # attention in its own code: not run row by row
    assert not ok and "own code" in why and "2+ CPU threads" in why


def test_a_model_that_is_not_invariant_says_so_in_its_done_markers():
    """The exception is declared where the promise is made: the engine records it and every
    shard's done marker carries it (``worker.engine_record``)."""
    from archs import build

    from batchgen.shard.worker import engine_record

    torch.set_num_threads(2)
    falcon = zoo_engine(build("falcon"), max_new_tokens=2)
    assert falcon.path == "hf" and not falcon.invariant
    record = engine_record(falcon)
    assert record["batch_invariant"] is False
    assert "falcon" in record["not_invariant_because"]
    torch.set_num_threads(1)
    granite = zoo_engine(build("granite"), max_new_tokens=2)
    assert granite.invariant and "batch_invariant" not in engine_record(granite)


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_hf_scores_are_bitwise_independent_of_their_batch(arch, threads):
    """mode: score on this path: a row's logprobs are the same bits alone and among rows of
    other lengths (sequences padded to their own width, rows to a multiple of MIN_ROWS)."""
    from batchgen.engine import ScoreRequest

    eng = zoo_engine(arch, logprobs=2)
    assert eng.path == "hf"
    torch.set_num_threads(threads)
    prompts = zoo_prompts((3, 9, 15, 22, 30, 41))
    items = [ScoreRequest(p, tuple(zoo_prompts((2 + i,), seed=9 + i)[0]))
             for i, p in enumerate(prompts)]
    alone = [eng.score([r])[0] for r in items]
    for mix in (items, items[::-1], items[1::2]):
        for r, got in zip(mix, eng.score(mix)):
            want = alone[items.index(r)]
            assert [t.logprob for t in got.logprobs] == [t.logprob for t in want.logprobs]
            assert [t.top for t in got.logprobs] == [t.top for t in want.logprobs]
