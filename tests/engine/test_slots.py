"""The slot path (decoder, attention, slots, probe) against plain Hugging Face, and against itself.

Models: the trained tiny model (``tiny_model``) and the zoo of random-weight architectures in
``archs``. Bitwise claims are checked on the logits each token was chosen from: ``Recorder``
wraps ``Sampler.choose`` and keeps every row's logits under its (seed, step), so a low-bit
difference fails even where it would not flip a token.
"""

from __future__ import annotations

import pytest
import torch
from archs import EOS, PAD, REFUSED, SERVABLE, SLIDING, VOCAB, ZooTokenizer, build

from batchgen.engine import Engine, Request
from batchgen.engine.attention import NAME, Decode, key_length, use_own
from batchgen.engine.decoder import SlotDecoder
from batchgen.engine.prefill import MIN_ROWS, PREFILL_BLOCK, round_up
from batchgen.engine.sampling import Sampler
from batchgen.spec import GenerationSpec

# granite and cohere scale their logits outside the LM head: the argmax survives, the
# distribution does not, so the slot path must refuse them although their attention is servable.
HEAD_SCALED = ["granite", "cohere"]
SERVED = [a for a in SERVABLE if a not in HEAD_SCALED]
NOT_SERVED = REFUSED + HEAD_SCALED
WHY = {  # a fragment of each refusal's reason
    "stablelm": "without its batchgen_slots argument",
    "gemma2": "softcapping",
    "gpt_oss": "sinks",
    "bloom": "registered attention function",
    "falcon": "registered attention function",
    "granite": "after the LM head",
    "cohere": "after the LM head",
}
FAST_SERVED = {"mistral_sliding", "gpt2"}  # the rest run in the slow lane
FAST_REFUSED = {"granite", "bloom"}
SAMPLED = {"temperature": 0.9, "top_p": 0.95}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the models are tiny, and on a busy box each GEMM of two threads waits
    for the second one to be scheduled (milliseconds per call). One test sets two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zoo_prompts(lengths, seed=5) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in lengths]


def zoo_engine(arch_or_model, *, path="auto", batch_size=8, **gen) -> Engine:
    model = build(arch_or_model) if isinstance(arch_or_model, str) else arch_or_model
    gen.setdefault("max_new_tokens", 12)
    return Engine(model, ZooTokenizer(), GenerationSpec(**gen), max_input_tokens=None,
                  batch_size=batch_size, path=path)


def upto_eos(ids: list[int], eos_ids) -> list[int]:
    """Tokens up to and including the first EOS (plain generate pads after it in batches)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


@torch.inference_mode()
def hf_greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """Plain ``generate``, one prompt, no padding, on the model's own attention."""
    use_own(model)
    ids = torch.tensor([list(prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=PAD)
    return upto_eos(out[0, len(prompt):].tolist(), {EOS})


class Recorder:
    """Wraps ``Sampler.choose``: ``run`` returns the completions and {(seed, step): logits row}
    of every token chosen (seeds must be unique within a run)."""

    def __init__(self, monkeypatch):
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        original = Sampler.choose
        recorder = self

        def choose(sampler, logits, seeds, steps, seen=None):
            for row, seed, step in zip(logits, seeds.tolist(), steps.tolist()):
                if not recorder.on:  # e.g. the probe of an engine being built
                    break
                if seed < 0:  # a padding row of a decode step (the scratch slot's seed)
                    continue
                assert (seed, step) not in recorder.logits, "seeds must be unique in a run"
                recorder.logits[(seed, step)] = row.clone()
            return original(sampler, logits, seeds, steps, seen)

        monkeypatch.setattr(Sampler, "choose", choose)

    on = False

    def run(self, engine, requests):
        self.logits, self.on = {}, True
        try:
            out = engine.generate(requests)
        finally:
            self.on = False
        return out, self.logits


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    """Every (seed, step) of ``want`` was chosen from bitwise the same logits in ``got``."""
    missing = sorted(set(want) - set(got))
    assert not missing, f"{what}: steps never decoded: {missing[:5]}"
    differ = [k for k in sorted(want) if not torch.equal(got[k], want[k])]
    assert not differ, (f"{what}: logits differ at (seed, step) {differ[:5]}, max |diff| "
                        f"{max(float((got[k] - want[k]).abs().max()) for k in differ):.3g}")


# -- the tiny model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """(model, tokenizer) of the trained tiny model, float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    from batchgen.engine.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    tok = load_tokenizer(ModelSpec(path=tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


def tiny_engine(tiny, *, batch_size=8, prefix=(), **gen) -> Engine:
    model, tok = tiny
    gen.setdefault("max_new_tokens", 16)
    eng = Engine(model, tok, GenerationSpec(**gen), max_input_tokens=None,
                 batch_size=batch_size, path="auto", prefix=prefix)
    assert eng.path == "slots", eng.path_reason
    return eng


TOPICS = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music", "bread",
          "mountains"]


def chat(topic: str, system: str = "You write one short sentence.") -> str:
    return (f"<|system|>\n{system}<|end|>\n<|user|>\nWrite one sentence about {topic}.<|end|>\n"
            "<|assistant|>\n")


def tiny_requests(tok, texts, seed=100) -> list[Request]:
    return [Request(tuple(tok(t)["input_ids"]), seed + i) for i, t in enumerate(texts)]


MIXED_TEXTS = (  # plain text (runs to the length limit) and chat (stops at <|end|>)
    [chat(t) for t in TOPICS[:6]]
    + ["The cat", "A robot builds a quiet garden in the morning. " * 3, "x",
       "The old town remembers the long road before the rain. " * 4]
)


# -- 1. greedy tokens equal plain generate, on every served architecture --------------------------


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=() if a in FAST_SERVED else pytest.mark.slow) for a in SERVED])
def test_slot_path_greedy_equals_hf_generate(arch):
    assert len(SERVED) >= 6 and len(SLIDING) >= 3
    eng = zoo_engine(arch)
    assert eng.path == "slots", eng.path_reason
    # Sliding-window archs (window 8): prompts well past the window, and decoding past it too.
    prompts = zoo_prompts((1, 5, 9, 20, 33, 40))
    got = eng.generate([Request(p, i) for i, p in enumerate(prompts)])
    assert eng.model.config._attn_implementation == NAME
    for p, c in zip(prompts, got):
        want = hf_greedy(eng.model, p, 12)
        assert upto_eos(c.token_ids, eng.eos_ids) == want, f"{arch}, prompt of {len(p)} tokens"
    assert eng.stats.decode_steps > 0 and eng.stats.prefix_positions == 0


# -- 2 and 9. what the slot path cannot serve goes to the Hugging Face path -----------------------


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=() if a in FAST_REFUSED else pytest.mark.slow) for a in NOT_SERVED])
def test_refused_architectures_fall_back_to_hf(arch):
    model = build(arch)
    with pytest.raises(ValueError, match="cannot serve"):
        zoo_engine(model, path="slots")
    eng = zoo_engine(model)
    assert eng.path == "hf" and WHY[arch] in eng.path_reason, eng.path_reason
    assert model.config._attn_implementation != NAME  # left on its own attention
    prompts = zoo_prompts((4, 11, 23, 30))
    got = eng.generate([Request(p, i) for i, p in enumerate(prompts)])
    for p, c in zip(prompts, got):
        assert upto_eos(c.token_ids, eng.eos_ids) == hf_greedy(model, p, 12), arch


def test_probe_refuses_a_layer_that_bypasses_the_interface():
    """A llama whose second layer reads its own config (plain sdpa, the slot cache never
    written): the probe counts the layers that called the slot attention and refuses."""
    import copy

    model = build("llama")
    attn = model.model.layers[1].self_attn
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = "sdpa"
    eng = zoo_engine(model)
    assert eng.path == "hf" and "only 1 of 2 layers" in eng.path_reason, eng.path_reason
    prompts = zoo_prompts((6, 17))
    got = eng.generate([Request(p, i) for i, p in enumerate(prompts)])
    assert [upto_eos(c.token_ids, eng.eos_ids) for c in got] == [
        hf_greedy(model, p, 12) for p in prompts]


# -- 3. bitwise invariance: a row alone, or in mixed batches of any size --------------------------


def _invariance(monkeypatch, eng, requests):
    rec = Recorder(monkeypatch)
    alone_out, alone = {}, {}
    for r in requests:
        out, logits = rec.run(eng, [r])
        alone_out[r.seed] = out[0].token_ids
        alone.update(logits)
    eng.batch_size = 8  # 10 requests > 8 slots: some are admitted late
    out, mixed = rec.run(eng, requests)
    assert_bitwise(mixed, alone, "all, 8 slots")
    assert [c.token_ids for c in out] == [alone_out[r.seed] for r in requests]
    # Another mix: every other request, reversed, with fillers of other lengths, 4 slots.
    some = requests[::-2]
    fillers = [Request(r.prompt_ids[: max(1, len(r.prompt_ids) // 2)], 10_000 + i)
               for i, r in enumerate(requests[1::2])]
    eng.batch_size = 4
    out, mixed = rec.run(eng, fillers[:2] + some + fillers[2:])
    assert_bitwise(mixed, {k: v for k, v in alone.items() if k[0] in {r.seed for r in some}},
                   "some, 4 slots")
    assert [c.token_ids for c in out[2:2 + len(some)]] == [alone_out[r.seed] for r in some]
    return alone_out


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_tiny_model_rows_are_bitwise_independent_of_their_batch(monkeypatch, tiny, sampling):
    eng = tiny_engine(tiny, **(SAMPLED if sampling else {}))
    requests = tiny_requests(tiny[1], MIXED_TEXTS)
    tokens = _invariance(monkeypatch, eng, requests)
    assert len({len(t) for t in tokens.values()}) > 2  # rows of different lengths


@pytest.mark.slow  # two threads on a busy box: each GEMM waits for the second thread
def test_rows_are_bitwise_independent_of_their_batch_on_two_threads(monkeypatch, tiny):
    """With 2+ threads MKL splits a GEMM's rows between threads and gives a short tail another
    kernel: a row's bits depend on the GEMM's row count unless it is a multiple of 4
    (``decoder.MIN_ROWS``; one thread hides this, and ``test_admission_equals_all_at_once``
    checks the shapes on any box). Six prompts of one prefill width: an LM head over 6 rows
    after the prefill, decode steps of 6 live rows."""
    eng = tiny_engine(tiny, **SAMPLED, max_new_tokens=4)
    torch.set_num_threads(2)  # after the probe: a GEMM on two threads is slow on a busy box
    requests = tiny_requests(tiny[1], [chat(t) for t in TOPICS[:6]])
    assert len({round_up(len(r.prompt_ids), PREFILL_BLOCK) for r in requests}) == 1
    rec = Recorder(monkeypatch)
    alone = {}
    for r in requests:
        alone.update(rec.run(eng, [r])[1])
    assert_bitwise(rec.run(eng, requests)[1], alone, "6 rows, 2 threads")


@pytest.mark.slow  # two threads on a busy box
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_multi_head_rows_are_bitwise_independent_of_their_batch_on_two_threads(monkeypatch, arch):
    """Without grouped-query attention a decode row has one query per head; CPU SDPA then gave
    a row other bits depending on the rows in the call on 2+ threads (both the in-place and the
    gathered branch). The decode attention is a fixed-shape per-row computation instead."""
    eng = zoo_engine(arch, **SAMPLED)
    assert eng.path == "slots"
    torch.set_num_threads(2)
    prompts = zoo_prompts((1, 3, 8, 9, 15, 22, 30, 37, 40, 64))
    _invariance(monkeypatch, eng, [Request(p, 50 + i) for i, p in enumerate(prompts)])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "starcoder2_sliding"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_zoo_rows_are_bitwise_independent_of_their_batch(monkeypatch, arch, sampling):
    eng = zoo_engine(arch, **(SAMPLED if sampling else {}))
    assert eng.path == "slots"
    prompts = zoo_prompts((1, 3, 8, 9, 15, 22, 30, 37, 40, 64))  # 64 + 12 crosses KEY_BLOCK
    _invariance(monkeypatch, eng, [Request(p, 50 + i) for i, p in enumerate(prompts)])


# -- 4. the n samples of a prompt share one prefill and equal unshared runs -----------------------


def test_forked_samples_equal_samples_prefilled_alone(monkeypatch, tiny):
    eng = tiny_engine(tiny, **SAMPLED)
    prompt = tiny_requests(tiny[1], [chat("tea")])[0].prompt_ids
    requests = [Request(prompt, 7 + s) for s in range(5)]
    rec = Recorder(monkeypatch)
    alone_out, alone = [], {}
    for r in requests:
        out, logits = rec.run(eng, [r])
        alone_out.append(out[0].token_ids)
        alone.update(logits)
    # 2 slots < 5 samples: the samples fork in chunks of 2 (a prefill each), and the cache never
    # grows past the batch size (it grew to the group's size before: unbounded by user data).
    for slots, prefills in ((8, 1), (2, 3)):
        eng.batch_size = slots
        eng._state.clear()
        before = eng.stats.padded_prompt_positions
        out, forked = rec.run(eng, requests)
        assert eng.stats.padded_prompt_positions - before == (
            prefills * round_up(len(prompt), PREFILL_BLOCK))
        assert eng._state["slots"].cache.slots <= slots
        assert_bitwise(forked, alone, f"forked, {slots} slots")
        assert [c.token_ids for c in out] == alone_out
    assert len({tuple(t) for t in alone_out}) > 1  # the seeds matter


# -- 5. the job prefix: prefilled once, the same tokens as without it -----------------------------


SYSTEM = "You write one short sentence about the topic you are given, nothing more."


def _common_prefix(lists) -> tuple[int, ...]:
    out = []
    for column in zip(*lists):
        if len(set(column)) > 1:
            break
        out.append(column[0])
    return tuple(out)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_prefix_equals_no_prefix(monkeypatch, tiny, sampling):
    tok = tiny[1]
    texts = [chat(t, SYSTEM) for t in TOPICS[:6]]
    requests = tiny_requests(tok, texts)
    prefix = _common_prefix([r.prompt_ids for r in requests])
    assert len(prefix) > 20 and round_up(len(prefix), PREFILL_BLOCK) != len(prefix)
    # A prompt that is the prefix exactly, and one that does not start with it.
    requests += [Request(prefix, 200), tiny_requests(tok, ["The cat sees"], 201)[0]]
    eng = tiny_engine(tiny, prefix=prefix, **(SAMPLED if sampling else {}))
    assert eng.prefix == prefix
    rec = Recorder(monkeypatch)
    with_prefix, logits_prefix = rec.run(eng, requests)
    suffixes = sum(round_up(len(r.prompt_ids) - len(prefix), PREFILL_BLOCK) for r in requests[:6])
    others = sum(round_up(len(r.prompt_ids), PREFILL_BLOCK) for r in requests[6:])
    assert eng.stats.prefix_positions == round_up(len(prefix), PREFILL_BLOCK)
    assert eng.stats.padded_prompt_positions == eng.stats.prefix_positions + suffixes + others
    again, _ = rec.run(eng, requests[2:4])  # a second call reuses the prefix's keys
    assert eng.stats.prefix_positions == round_up(len(prefix), PREFILL_BLOCK)
    assert [c.token_ids for c in again] == [c.token_ids for c in with_prefix[2:4]]

    eng.set_prefix(())
    assert eng.prefix == ()
    without, _ = rec.run(eng, requests)
    assert [c.token_ids for c in with_prefix] == [c.token_ids for c in without]
    assert eng.stats.prefix_positions == round_up(len(prefix), PREFILL_BLOCK)  # no new prefix
    if sampling:
        # Prefix + suffix splits the prompt's computation differently from one prefill, so the
        # logits are NOT bitwise those without a prefix (measured: equal for 7 of these 8
        # prompts, ~1e-6 apart for one). The contract is within the split: with the prefix, a
        # row's logits are bitwise the same alone as in the batch.
        eng.set_prefix(prefix)
        for r in requests:
            _, alone = rec.run(eng, [r])
            assert_bitwise(logits_prefix, alone, f"prefix, prompt of {len(r.prompt_ids)} alone")


# -- 6. admission into freed slots gives the same tokens as admitting everything at once ----------


def test_admission_equals_all_at_once(monkeypatch, tiny):
    tok = tiny[1]
    texts = [chat(TOPICS[i % 10], "Be brief." * (i % 4)) if i % 3 else
             "The river follows the bright moon. " * (1 + i % 5) for i in range(24)]
    requests = tiny_requests(tok, texts)
    eng = tiny_engine(tiny, batch_size=4, **SAMPLED, max_new_tokens=16)
    rec = Recorder(monkeypatch)
    queued, logits_queued = rec.run(eng, requests)
    assert eng.stats.busy_occupancy >= 0.9, eng.stats.busy_occupancy
    eng.batch_size, eng.stats = 64, type(eng.stats)()
    # Every GEMM's row count must be a multiple of MIN_ROWS: with 2+ threads the bits of a row
    # depend on it otherwise. Checked on the shapes, so whatever the threads.
    rows, live = [], []
    hooks = [m.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
             for m in eng.model.modules() if isinstance(m, torch.nn.Linear)]
    decode = SlotDecoder._decode

    def counting(self, step_rows):
        live.append(len(step_rows))
        return decode(self, step_rows)

    monkeypatch.setattr(SlotDecoder, "_decode", counting)
    try:
        at_once, logits_at_once = rec.run(eng, requests)
    finally:
        for h in hooks:
            h.remove()
    assert rows and all(n % MIN_ROWS == 0 for n in rows), sorted(set(rows))
    assert any(n % MIN_ROWS for n in live)  # live row counts that needed padding
    assert eng.stats.busy_slot_steps == 0  # nothing waited: rows only left as they finished
    assert [c.token_ids for c in queued] == [c.token_ids for c in at_once]
    assert_bitwise(logits_queued, logits_at_once, "4 slots vs 64")
    reasons = [c.finish_reason for c in queued]
    assert reasons.count("stop") >= 10 and reasons.count("length") >= 3
    assert len({c.generated_tokens for c in queued}) > 4


# -- 7. the step a finished row runs past its end never reaches the output ------------------------


def test_tokens_past_eos_are_dropped(monkeypatch, tiny):
    tok = tiny[1]
    requests = tiny_requests(tok, MIXED_TEXTS)
    eng = tiny_engine(tiny, max_new_tokens=30)
    rec = Recorder(monkeypatch)
    out, logits = rec.run(eng, requests)
    stopped = 0
    for r, c in zip(requests, out):
        assert c.generated_tokens == len(c.token_ids) <= 30
        if c.finish_reason == "stop":
            stopped += 1
            assert c.token_ids[-1] in eng.eos_ids
            assert not set(c.token_ids[:-1]) & eng.eos_ids
            assert (r.seed, len(c.token_ids)) in logits  # the extra step ran, its token dropped
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 30
            assert not set(c.token_ids) & eng.eos_ids
            assert (r.seed, 30) not in logits  # never past max_new_tokens
    assert stopped >= 4

    eng = tiny_engine(tiny, max_new_tokens=30, ignore_eos=True)
    out, logits = rec.run(eng, requests)
    assert all(c.finish_reason == "length" and c.generated_tokens == len(c.token_ids) == 30
               for c in out)
    assert max(step for _, step in logits) == 29
    eos = tok.eos_token_id
    assert any(eos in c.token_ids[:-1] for c in out)  # EOS was chosen, and generation went on


# -- 8. one decode step traces whole under torch.compile (the proxy for "capturable") -------------


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=() if a == "mistral_sliding" else pytest.mark.slow)
    for a in ["llama", "qwen2", "mistral_sliding", "gemma3_text_sliding", "gpt2"]])
def test_decode_step_traces_with_fullgraph(arch):
    model = build(arch)
    gen = GenerationSpec(max_new_tokens=4, ignore_eos=True)
    decoder = SlotDecoder(model, gen, eos_ids=set(), pad_id=PAD, slots=4, max_batch_tokens=4096,
                          hit_stop=lambda ids: False)
    prompts = zoo_prompts((70, 9))
    decoder.run([Request(p, i) for i, p in enumerate(prompts)])  # the cache now holds their keys
    cache = decoder.cache
    positions = [len(p) + 3 for p in prompts] + [0, 0]  # 2 rows + 2 padding rows
    slots = torch.tensor([0, 1, cache.scratch, cache.scratch])
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(positions):
        buckets.setdefault(key_length(p), []).append(i)
    assert len(buckets) == 2  # two key lengths: the per-group loop runs twice
    groups = [(torch.tensor(rows), length) for length, rows in sorted(buckets.items())]
    ids = torch.tensor([[5], [6], [PAD], [PAD]])
    positions = torch.tensor(positions)

    def step(ids, positions, handle):
        return decoder.logits(decoder.hidden(ids, positions[:, None], handle)[:, -1])

    def snapshot():
        return {i: (k.clone(), cache.values[i].clone()) for i, k in cache.keys.items()}

    def restore(saved):
        for i, (k, v) in saved.items():
            cache.keys[i].copy_(k)
            cache.values[i].copy_(v)

    with torch.inference_mode():
        before = snapshot()
        eager = step(ids, positions, Decode(cache, slots, positions, groups))
        eager_cache = snapshot()
        restore(before)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        try:
            traced = compiled(ids, positions, Decode(cache, slots, positions, groups))
        finally:
            torch._dynamo.reset()
    assert torch.equal(traced, eager)
    after = snapshot()
    assert all(torch.equal(after[i][0], eager_cache[i][0]) and
               torch.equal(after[i][1], eager_cache[i][1]) for i in after)
    assert any(not torch.equal(before[i][0], after[i][0]) for i in after)  # it wrote the keys


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral_sliding", *REFUSED])
def test_scores_equal_the_models_own_logprobs(arch):
    """Teacher-forced scores on whichever path the architecture takes (slot path, or the
    Hugging Face path left-padded with only the last positions' logits) equal log_softmax of
    the model's own logits over the unpadded prompt + completion."""
    from batchgen.engine import ScoreRequest

    model = build(arch)
    eng = zoo_engine(model)
    prompts = zoo_prompts((4, 11, 23))
    completions = zoo_prompts((5, 2, 9), seed=9)
    scores = eng.score([ScoreRequest(p, c) for p, c in zip(prompts, completions)])
    use_own(model)
    for p, c, s in zip(prompts, completions, scores):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(p) + list(c[:-1])])).logits[0].float()
        want = logits[len(p) - 1:].log_softmax(-1)[torch.arange(len(c)), torch.tensor(c)]
        assert [t.logprob for t in s.logprobs] == pytest.approx(want.tolist(), abs=1e-4), arch
