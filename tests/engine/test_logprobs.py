"""Log-probabilities of generated tokens, and teacher-forced scores, on both decoding paths.

The contract users rely on: a generated token's logprob is the model's own (before temperature,
top-k/top-p, penalty and constraint), and the sum of a generated row's logprobs equals the score
of the same tokens under the same prompt (``Engine.score``), so generate-then-filter and
score-only jobs agree.
"""

import math

import pytest
import torch

from batchgen.engine import Engine, Request, ScoreRequest
from batchgen.engine.attention import use_own
from batchgen.engine.loading import load_tokenizer
from batchgen.spec import GenerationSpec, ModelSpec

PROMPTS = [
    "The cat",
    "Write one sentence about tea.",
    "<|user|>\nWrite one sentence about birds.<|end|>\n<|assistant|>\n",
    "A robot builds a quiet garden in the morning. " * 4,
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ModelSpec(path=tiny_model))
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), tok


def make(tiny, path, **gen):
    model, tok = tiny
    return Engine(model, tok, GenerationSpec(**{"max_new_tokens": 12, **gen}),
                  max_input_tokens=None, batch_size=8, path=path)


def requests(tok, texts=PROMPTS, seed=0):
    return [Request(tuple(ids), seed + i) for i, ids in enumerate(tok(texts)["input_ids"])]


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_logprobs_are_the_models_own(tiny, path):
    """Each token's logprob is log_softmax of the model's logits at that position, whatever
    the temperature; the top list is sorted and holds the K likeliest tokens."""
    model, tok = tiny
    engine = make(tiny, path, logprobs=3, temperature=1.7, top_p=0.8, seed=1)
    for req, c in zip(requests(tok), engine.generate(requests(tok))):
        assert c.logprobs is not None and 0 < len(c.logprobs) <= len(c.token_ids)
        ids = torch.tensor([list(req.prompt_ids) + c.token_ids[:-1]])
        use_own(model)  # the model's own attention, as a user would call it
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, len(req.prompt_ids) - 1:].float().log_softmax(-1)
        for step, t in enumerate(c.logprobs):
            assert t.token_id == c.token_ids[step]
            assert t.token == tok.decode([t.token_id])
            assert t.logprob == pytest.approx(float(logp[step, t.token_id]), abs=1e-4)
            assert len(t.top) == 3
            values = [v for _, _, v in t.top]
            assert values == sorted(values, reverse=True)
            best = torch.topk(logp[step], 3)
            assert [i for i, _, _ in t.top] == best.indices.tolist()
        assert c.cumulative_logprob == pytest.approx(sum(t.logprob for t in c.logprobs))


def test_greedy_tokens_are_the_top_alternative(tiny):
    engine = make(tiny, "slots", logprobs=1)
    for c in engine.generate(requests(tiny[1])):
        for t in c.logprobs:
            assert t.top[0][0] == t.token_id and t.top[0][2] == t.logprob


def test_logprobs_zero_gives_the_chosen_token_only(tiny):
    c = make(tiny, "slots", logprobs=0).generate(requests(tiny[1])[:1])[0]
    assert c.logprobs and all(t.top == () for t in c.logprobs)


def test_no_logprobs_unless_asked(tiny):
    c = make(tiny, "slots").generate(requests(tiny[1])[:1])[0]
    assert c.logprobs is None and c.cumulative_logprob is None


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_a_generated_rows_logprobs_sum_to_the_score_of_its_text(tiny, path):
    """The sum of a generated row's token logprobs equals the teacher-forced score of the same
    tokens under the same prompt (sampled rows too: logprobs are the model's, not the
    sampler's)."""
    model, tok = tiny
    engine = make(tiny, path, logprobs=0, temperature=1.0, n=1, seed=3)
    reqs = requests(tok)
    generated = engine.generate(reqs)
    scores = engine.score([ScoreRequest(r.prompt_ids, tuple(c.token_ids))
                           for r, c in zip(reqs, generated)])
    for c, s in zip(generated, scores):
        assert s.error is None
        listed = [t.token_id for t in c.logprobs]
        assert listed == c.token_ids[:len(listed)]
        assert s.logprob - s.logprobs[-1].logprob * (len(listed) < len(c.token_ids)) == (
            pytest.approx(c.cumulative_logprob, abs=1e-3))
        for a, b in zip(c.logprobs, s.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_a_row_that_ends_on_eos_sums_the_logprobs_of_its_text(tiny, path):
    """The end-of-sequence token is not text: it is not listed, and a row that stops on it has
    the cumulative_logprob of its text as ``mode: score`` scores it."""
    model, tok = tiny
    engine = make(tiny, path, logprobs=0, max_new_tokens=48)
    reqs = requests(tok, [PROMPTS[2], "<|user|>\nWrite one sentence about tea.<|end|>\n"
                          "<|assistant|>\n"])
    generated = engine.generate(reqs)
    ended = [(r, c) for r, c in zip(reqs, generated) if c.token_ids[-1] in engine.eos_ids]
    assert ended, [c.finish_reason for c in generated]
    for r, c in ended:
        assert c.finish_reason == "stop"
        assert [t.token_id for t in c.logprobs] == c.token_ids[:-1]
        text = tuple(tok(c.text, add_special_tokens=False)["input_ids"])
        assert text == tuple(c.token_ids[:-1])
        score = engine.score([ScoreRequest(r.prompt_ids, text)])[0]
        assert c.cumulative_logprob == pytest.approx(score.logprob, abs=1e-3)


def test_scores_agree_across_paths_and_with_the_prefix(tiny):
    """The slot path (packed, with and without the shared prefix) and the Hugging Face path
    give the same scores."""
    model, tok = tiny
    system = "<|system|>\nYou answer in one short sentence about the topic.<|end|>\n"
    texts = [system + f"<|user|>\nWrite one sentence about {t}.<|end|>\n<|assistant|>\n"
             for t in ("tea", "rivers", "the moon")]
    answers = ["The cat sees a red apple today.<|end|>", "A robot", "The river finds the moon."]
    items = [ScoreRequest(tuple(p), tuple(a)) for p, a in
             zip(tok(texts)["input_ids"], tok(answers, add_special_tokens=False)["input_ids"])]
    hf = make(tiny, "hf", logprobs=2).score(items)
    plain = make(tiny, "slots", logprobs=2)
    prefixed = make(tiny, "slots", logprobs=2)
    shared = tuple(tok(system + "<|user|>\nWrite one sentence about")["input_ids"][:-1])
    prefixed.set_prefix(shared)
    a, b = plain.score(items), prefixed.score(items)
    assert prefixed.stats.prefix_positions > 0
    for x, y, z in zip(a, b, hf):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert x.logprob == pytest.approx(z.logprob, abs=1e-4)
        assert [t.top[0][0] for t in x.logprobs] == [t.top[0][0] for t in z.logprobs]


def test_a_rows_score_does_not_depend_on_its_batch(tiny):
    """Bitwise: scored alone or among others, under a small token budget or a large one."""
    model, tok = tiny
    items = [ScoreRequest(tuple(p), tuple(c)) for p, c in zip(
        tok(PROMPTS)["input_ids"], tok(["The moon."] * 4, add_special_tokens=False)["input_ids"])]
    together = make(tiny, "slots").score(items)
    for i, item in enumerate(items):
        alone = make(tiny, "slots").score([item])[0]
        assert [t.logprob for t in alone.logprobs] == [t.logprob for t in together[i].logprobs]
    small = make(tiny, "slots")
    small.max_batch_tokens = 64
    assert [s.logprob for s in small.score(items)] == [s.logprob for s in together]


def test_a_rows_logprobs_do_not_depend_on_its_batch(tiny):
    model, tok = tiny
    reqs = requests(tok)
    engine = make(tiny, "slots", logprobs=2, temperature=0.9, seed=5)
    together = engine.generate(reqs)
    for r, c in zip(reqs, together):
        alone = make(tiny, "slots", logprobs=2, temperature=0.9, seed=5).generate([r])[0]
        assert alone.logprobs == c.logprobs


def test_perplexity_of_a_likely_text_is_lower(tiny):
    """What users score for: the text the model itself prefers scores higher than a shuffled
    one."""
    model, tok = tiny
    engine = make(tiny, "slots")
    prompt = tuple(tok("<|user|>\nWrite one sentence about tea.<|end|>\n<|assistant|>\n")["input_ids"])
    greedy = engine.generate([Request(prompt, 0)])[0].token_ids
    shuffled = list(reversed(greedy))
    a, b = engine.score([ScoreRequest(prompt, tuple(greedy)), ScoreRequest(prompt, tuple(shuffled))])
    assert a.logprob > b.logprob
    assert math.exp(-a.logprob / len(greedy)) < math.exp(-b.logprob / len(greedy))
