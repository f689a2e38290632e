from contextlib import contextmanager

import pytest

from batchgen.engine import Engine, PromptTooLong, Request
from batchgen.errors import ModelError
from batchgen.io.modelcheck import check_model
from batchgen.spec import GenerationSpec, InputSpec, ModelSpec, ResourcesSpec

PROMPTS = [
    "x",
    "The cat",
    "Write one sentence about tea.",
    "A robot builds a quiet garden in the morning. " * 6,
    "The old town remembers the long road before the rain. " * 20,  # ~200 tokens
    "<|user|>\nWrite one sentence about birds.<|end|>\n<|assistant|>\n",
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(
        ModelSpec(path=tiny_model), GenerationSpec(max_new_tokens=20), ResourcesSpec(batch_size=4)
    )


def with_gen(engine, **kw):
    engine.gen = GenerationSpec(**kw)
    engine._stop_window = 2 * max((len(s) for s in engine.gen.stop), default=0) + 4
    return engine


def requests(engine, texts=PROMPTS, seed=0):
    return [Request(engine.fit(ids), seed + i) for i, ids in enumerate(engine.tokenize(texts))]


def test_batched_greedy_equals_one_at_a_time(engine):
    with_gen(engine, max_new_tokens=20)
    reqs = requests(engine)
    lengths = sorted(len(r.prompt_ids) for r in reqs)
    assert lengths[0] == 1 and lengths[-1] > 150  # very different lengths share batches
    batched = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.generated_tokens > 0 for c in batched) and sum(bool(c.text) for c in batched) >= 4


def test_seeded_sampling_is_independent_of_batching(engine):
    with_gen(engine, max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=40, n=2,
             repetition_penalty=1.1)
    reqs = requests(engine, seed=100)
    batched = [c.text for c in engine.generate(reqs)]
    alone = [engine.generate([r])[0].text for r in reqs]
    engine.batch_size = 2
    pairs = [c.text for c in engine.generate(reqs)]
    engine.batch_size = 4
    assert batched == alone == pairs
    other_seeds = [c.text for c in engine.generate(requests(engine, seed=999))]
    assert other_seeds != batched


def test_max_new_tokens_and_length_finish(engine):
    with_gen(engine, max_new_tokens=3)
    out = engine.generate(requests(engine))
    assert all(c.generated_tokens <= 3 for c in out)
    assert any(c.finish_reason == "length" and c.generated_tokens == 3 for c in out)


def test_eos_stops_generation(engine):
    with_gen(engine, max_new_tokens=60)
    out = engine.generate(requests(engine, [PROMPTS[-1]]))[0]
    # the tiny model was trained to end chat answers with <|end|>
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_ids
    assert "<|end|>" not in out.text


def test_stop_string_cuts_output(engine):
    with_gen(engine, max_new_tokens=30)
    full = engine.generate(requests(engine, ["The cat"]))[0]
    words = full.text.split()
    assert len(words) >= 4
    stop = " " + words[2]
    with_gen(engine, max_new_tokens=30, stop=[stop, "never-appears"])
    cut = engine.generate(requests(engine, ["The cat"]))[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.generated_tokens < full.generated_tokens  # decoding stopped early


def test_truncation_sides_and_error(engine, tiny_model):
    with_gen(engine, max_new_tokens=8)
    engine.max_input_tokens = 10
    ids = list(range(20, 60))
    engine.truncation = "left"
    assert engine.fit(ids) == tuple(ids[-10:])
    engine.truncation = "right"
    assert engine.fit(ids) == tuple(ids[:10])
    engine.truncation = "error"
    with pytest.raises(PromptTooLong, match="40 tokens, more than model.max_input_tokens=10"):
        engine.fit(ids)
    assert engine.fit(ids[:10]) == tuple(ids[:10])
    engine.truncation, engine.max_input_tokens = "left", 512 - 20


def test_prompt_longer_than_context_is_truncated_and_runs(tiny_model):
    e = Engine.load(ModelSpec(path=tiny_model), GenerationSpec(max_new_tokens=16), ResourcesSpec())
    assert e.max_input_tokens == 512 - 16
    (ids,) = e.tokenize(["The river sees the moon. " * 200])
    assert len(ids) > 512
    out = e.generate([Request(e.fit(ids))])[0]
    assert 0 < out.generated_tokens <= 16


def test_batches_respect_size_and_token_budget(engine):
    with_gen(engine, max_new_tokens=10)
    engine.batch_size, engine.max_batch_tokens = 4, 199
    lengths = [5, 90, 3, 40, 40, 7, 7, 7, 7, 7, 1]
    batches = engine.plan_batches(lengths)
    engine.batch_size, engine.max_batch_tokens = 4, 32768
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 199
    assert batches[0] == [1]  # longest first, alone: 2 x (90 + 10) > 199


def test_tokenizer_without_pad_falls_back_to_eos(engine):
    assert engine.tokenizer.pad_token_id == engine.tokenizer.eos_token_id is not None


def test_check_model_catches_bad_specs_before_loading_weights(tiny_model, tmp_path):
    info = check_model(ModelSpec(path=tiny_model), GenerationSpec(), InputSpec(path="x", chat=True))
    assert info["context"] == 512
    with pytest.raises(ModelError, match="exceed .*context of 512 tokens"):
        check_model(ModelSpec(path=tiny_model, max_input_tokens=400),
                    GenerationSpec(max_new_tokens=200), InputSpec(path="x"))
    with pytest.raises(ModelError, match=f"model.path {tmp_path}: cannot load the model config"):
        check_model(ModelSpec(path=str(tmp_path)), GenerationSpec(), InputSpec(path="x"))


def test_chat_without_a_chat_template_is_refused(tiny_model, tmp_path):
    import json
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="input.chat is true but .* has no chat template"):
        check_model(ModelSpec(path=str(plain)), GenerationSpec(), InputSpec(path="x", chat=True))
    check_model(ModelSpec(path=str(plain)), GenerationSpec(), InputSpec(path="x"))


@contextmanager
def faults(engine, fault):
    """Inject a fault into the engine's model passes, the way a GPU would: running out of memory
    on big batches, or overflowing to NaN in half precision. ``fault(rows, width, dtype, ids)``
    sees each pass's real rows (padding rows left out), its width (1 for a decode step), the
    weights' dtype and its input ids (a list per row); it may raise, or return True to turn that pass's output
    NaN."""

    from batchgen.engine.attention import Prefill
    from batchgen.engine.decoder import SlotDecoder
    from batchgen.engine.hfdecode import HFDecoder

    def slot_hidden(self, ids, positions, step):
        if isinstance(step, Prefill):  # prompts packed into one sequence: one row each
            rows, width = sum(len(s.slots) for s in step.segments), max(
                s.width for s in step.segments)
            flat = ids[0].tolist()
            seen = [flat[s.start + i * s.width:s.start + (i + 1) * s.width]
                    for s in step.segments for i in range(len(s.slots))]
        else:
            rows, width, seen = int((step.slots != self.cache.scratch).sum()), 1, ids.tolist()
        nan = fault(rows, width, next(self.model.parameters()).dtype, seen)
        hidden = real_slot_hidden(self, ids, positions, step)
        return hidden * float("nan") if nan else hidden

    class Faulty:
        def __init__(self, model, decoder):
            self.__dict__["_model"] = model
            self.__dict__["_live"] = lambda: decoder.live  # padding and finished rows left out

        def __call__(self, **kw):
            ids = kw["input_ids"][self._live()]
            nan = fault(ids.shape[0], ids.shape[1], self._model.dtype, ids.tolist())
            out = self._model(**kw)
            if nan:
                out.logits[:] = float("nan")
            return out

        def __getattr__(self, name):
            return getattr(self._model, name)

    real_slot_hidden, real_hf_init = SlotDecoder.hidden, HFDecoder.__init__

    def hf_init(self, model, *args, **kw):
        real_hf_init(self, model, *args, **kw)
        self.model = Faulty(model, self)

    SlotDecoder.hidden, HFDecoder.__init__ = slot_hidden, hf_init
    try:
        yield
    finally:
        SlotDecoder.hidden, HFDecoder.__init__ = real_slot_hidden, real_hf_init


@pytest.fixture(params=["slots", "hf"])
def any_path(request, engine):
    """The module's engine on each decode path in turn."""
    real = engine.path
    engine.path = request.param
    yield engine
    engine.path = real


def test_out_of_memory_splits_the_batch_and_outputs_do_not_change(any_path):
    import torch

    engine = any_path
    with_gen(engine, max_new_tokens=12, temperature=1.0, seed=0)
    reqs = requests(engine, seed=5)
    clean = [c.token_ids for c in engine.generate(reqs)]

    def oom_over_one_row(rows, width, dtype, ids):
        if rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    splits_before = engine.stats.splits
    with faults(engine, oom_over_one_row):
        got = engine.generate(reqs)
    assert [c.token_ids for c in got] == clean  # per-row seeds: a split changes nothing
    assert engine.stats.splits > splits_before


def test_a_row_that_fails_alone_becomes_an_error_and_the_rest_goes_on(any_path):
    engine = any_path
    with_gen(engine, max_new_tokens=8)
    reqs = requests(engine)
    longest = max(len(r.prompt_ids) for r in reqs)

    def oom_on_longest(rows, width, dtype, ids):
        if width >= longest:  # the prefill of any batch holding it
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 8589934592 bytes")

    with faults(engine, oom_on_longest):
        got = engine.generate(reqs)
    for r, c in zip(reqs, got):
        if len(r.prompt_ids) == longest:
            assert c.finish_reason == "error" and "out of memory" in c.error and c.text is None
        else:
            assert c.finish_reason in ("stop", "length") and c.error is None


def test_other_errors_are_not_mistaken_for_memory(any_path):
    def broken(rows, width, dtype, ids):
        raise RuntimeError("shape mismatch")

    with faults(any_path, broken), pytest.raises(RuntimeError, match="shape mismatch"):
        any_path.generate(requests(any_path)[:2])


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_nan_logits_in_half_precision_are_retried_alone_in_float32(tiny_model, path):
    import torch

    bf16 = Engine.load(ModelSpec(path=tiny_model, dtype="bfloat16"),
                       GenerationSpec(max_new_tokens=8), ResourcesSpec(batch_size=4))
    bf16.path = path
    reqs = requests(bf16)
    target = reqs[1].prompt_ids  # "The cat"

    def holds(ids):  # a pass over the prompt: its prefill
        text = [",".join(map(str, row)) for row in ids]
        return any(",".join(map(str, target)) in t for t in text)

    def nan_in_bf16(rows, width, dtype, ids):  # the prefill holding that prompt overflows
        return dtype == torch.bfloat16 and holds(ids)

    with faults(bf16, nan_in_bf16):
        got = bf16.generate(reqs)
    assert all(c.finish_reason in ("stop", "length") for c in got)
    assert bf16.stats.float32_retries >= 1 and bf16.stats.splits >= 1
    assert bf16.model.dtype == torch.bfloat16  # restored after the float32 retry

    def nan_always(rows, width, dtype, ids):
        return holds(ids)

    with faults(bf16, nan_always):
        got = bf16.generate(reqs)
    assert got[1].finish_reason == "error" and "NaN" in got[1].error and "float32" in got[1].error
    assert sum(c.finish_reason == "error" for c in got) == 1


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_model):
    eng = Engine.load(ModelSpec(path=tiny_model), GenerationSpec(max_new_tokens=24, ignore_eos=True),
                      ResourcesSpec(batch_size=4))
    done = eng.generate(requests(eng, ["The cat sat on the mat.", "x"]))
    assert [c.generated_tokens for c in done] == [24, 24]
    assert all(c.finish_reason == "length" for c in done)


def test_grouped_prefill_keeps_padding_low_and_outputs_equal(engine):
    with_gen(engine, max_new_tokens=6)
    reqs = requests(engine)
    before = (engine.stats.prompt_tokens, engine.stats.padded_prompt_positions)
    engine.batch_size = len(reqs)  # one decode batch over prompts of 1 to ~200 tokens
    try:
        together = [c.token_ids for c in engine.generate(reqs)]
    finally:
        engine.batch_size = 4
    real = engine.stats.prompt_tokens - before[0]
    padded = engine.stats.padded_prompt_positions - before[1]
    assert real / padded >= 0.9  # one padded prefill would be ~0.3 here
    assert together == [engine.generate([r])[0].token_ids for r in reqs]


def test_echo_engine_needs_no_model():
    from batchgen.engine import EchoEngine, load_engine

    eng = load_engine(ModelSpec(path="none", engine="echo"), GenerationSpec(), ResourcesSpec())
    assert isinstance(eng, EchoEngine)
    out = eng.generate([Request(tuple(ids)) for ids in eng.tokenize(["a b c", "d"])])
    assert [(c.text, c.finish_reason) for c in out] == [("[echo]", "stop")] * 2
    with pytest.raises(ModelError, match="'echo' has no chat template"):
        check_model(ModelSpec(path="none", engine="echo"), GenerationSpec(), InputSpec(path="x", chat=True))


def _buffers(model):
    return {name: (b.dtype, b.clone()) for name, b in model.named_buffers()}


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_a_float32_retry_leaves_buffers_and_later_outputs_unchanged(tiny_model, path):
    """The float32 retry used to upcast the whole model and cast it back with model.to(bf16),
    turning float32 buffers such as RoPE's inv_freq into bf16 for good: later rows changed."""
    import torch

    bf16 = Engine.load(ModelSpec(path=tiny_model, dtype="bfloat16"),
                       GenerationSpec(max_new_tokens=12, temperature=1.0),
                       ResourcesSpec(batch_size=4))
    bf16.path = path
    buffers = _buffers(bf16.model)
    assert any(dtype == torch.float32 for dtype, _ in buffers.values())  # inv_freq
    reqs = [Request(r.prompt_ids, r.seed) for r in requests(bf16, PROMPTS * 2, seed=40)]
    before = [c.token_ids for c in bf16.generate(reqs)]
    target = reqs[1].prompt_ids

    def nan_once_in_bf16(rows, width, dtype, ids):
        return dtype == torch.bfloat16 and any(
            row[:len(target)] == list(target) or row[-len(target):] == list(target)
            for row in ids) and width > 1

    with faults(bf16, nan_once_in_bf16):
        bf16.generate(reqs[:2])
    assert bf16.stats.float32_retries >= 1
    after = _buffers(bf16.model)
    assert {k: d for k, (d, _) in after.items()} == {k: d for k, (d, _) in buffers.items()}
    assert all(torch.equal(after[k][1], v) for k, (_, v) in buffers.items())
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert [c.token_ids for c in bf16.generate(reqs)] == before


def test_running_out_of_memory_while_upcasting_restores_the_weights(tiny_model, monkeypatch):
    """An out-of-memory half-way through the float32 upcast used to happen outside the try:
    the model stayed half float32 and the replica failed every shard after."""
    import torch

    bf16 = Engine.load(ModelSpec(path=tiny_model, dtype="bfloat16"),
                       GenerationSpec(max_new_tokens=8), ResourcesSpec(batch_size=4))
    reqs = requests(bf16)
    before = [c.token_ids for c in bf16.generate(reqs)]

    params = list(bf16.model.parameters())
    victim = params[len(params) // 2].data_ptr()  # half-way through the upcast
    real_float, failed = torch.Tensor.float, []

    def upcast(self, *args, **kwargs):
        if self.data_ptr() == victim and self.dtype == torch.bfloat16:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_float(self, *args, **kwargs)

    target = reqs[1].prompt_ids

    def nan_on_target(rows, width, dtype, ids):
        return any(row[:len(target)] == list(target) or row[-len(target):] == list(target)
                   for row in ids) and width > 1

    with faults(bf16, nan_on_target), monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "float", upcast)
        got = bf16.generate(reqs)
    assert failed and got[1].finish_reason == "error"
    assert "float32 retry ran out of memory" in got[1].error
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert [c.token_ids for c in bf16.generate(reqs)] == before


def test_sliding_window_models_on_the_hf_path_match_generate():
    """Stacked prefill caches assumed full-attention layers: a sliding-window model with prompts
    of different lengths past its window got wrong attention on the Hugging Face path."""
    import torch
    from archs import VOCAB, ZooTokenizer, build

    model = build("mistral_sliding")
    tok = ZooTokenizer()
    eng = Engine(model, tok, GenerationSpec(max_new_tokens=10, ignore_eos=True),
                 max_input_tokens=None, batch_size=8, path="hf")
    prompts = [tuple(3 + (i * 7 + k) % (VOCAB - 3) for i in range(n))
               for k, n in enumerate((30, 4, 27, 12, 29, 5, 22, 31))]
    got = eng.generate([Request(p, 0) for p in prompts])
    for p, c in zip(prompts, got):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
        assert c.token_ids == ref[0, len(p):].tolist()


def test_a_new_generation_spec_takes_its_eos_setting_with_it(engine):
    """Bug (found by the structured tests): ``engine.gen = ...`` kept the EOS ids of the spec
    the engine was made with, so ignore_eos set later was ignored (and the reverse)."""
    with_gen(engine, max_new_tokens=12, ignore_eos=True)
    assert engine.eos_ids == set()
    done = engine.generate(requests(engine, ["<|user|>\nHi<|end|>\n<|assistant|>\n"]))
    assert done[0].generated_tokens == 12 and done[0].finish_reason == "length"
    with_gen(engine, max_new_tokens=12)
    assert engine.eos_ids
