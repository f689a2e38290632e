"""The sampler on hand-made logits: which tokens each setting allows, and how often each comes.

Each row of a batch has its own seed, so one call draws thousands of independent samples. The
expected distributions come from a plain-Python reference (temperature, then top-k, then top-p,
as Hugging Face applies them), and frequencies are compared with Pearson's chi-square under a
fixed, generous bound; the seeds are fixed, so every run draws the same tokens.

Only ``make_sampler`` and ``draw`` know the sampler's interface; retarget them when it changes.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from batchgen.engine import Request
from batchgen.sampling import Sampler as _Sampler
from batchgen.spec import GenerationSpec

SEEDS = 4000  # samples per distribution: 120+ expected draws for every token allowed below
CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


def make_sampler(gen: GenerationSpec, prompts: list[list[int]], seeds: list[int], *,
                 pad_id: int = 0, device: str = "cpu"):
    """A sampler over a batch whose prompts are left-padded with ``pad_id`` under mask 0, the
    way the engine pads them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    requests = [Request(tuple(p), seed) for p, seed in zip(prompts, seeds)]
    return _Sampler(gen, requests, ids.to(device), mask.to(device), device)


def draw(logits, *, seeds=range(SEEDS), prompts=None, pad_id=0, generated=(), device="cpu",
         **generation) -> list[int]:
    """The token each row picks, all rows in one batch, one seed per row.

    ``logits``: one row shared by every seed, or one row per seed. ``prompts``: each row's
    prompt ids (default: empty). ``generated``: tokens every row produced in earlier steps.
    ``generation``: GenerationSpec fields."""
    seeds = list(seeds)
    logits = torch.tensor(logits, dtype=torch.float32, device=device)
    if logits.dim() == 1:
        logits = logits.repeat(len(seeds), 1)
    prompts = prompts if prompts is not None else [[] for _ in seeds]
    sampler = make_sampler(GenerationSpec(max_new_tokens=16, **generation), prompts, seeds,
                           pad_id=pad_id, device=device)
    if generated:
        sampler.choose(logits)  # the first step, whose tokens we then replace
        for token in generated:
            sampler.observe(torch.full((len(seeds),), token, dtype=torch.long, device=device))
    return sampler.choose(logits).tolist()


# -- Reference -------------------------------------------------------------------------------


def softmax(xs: list[float]) -> list[float]:
    top = max(x for x in xs if x != -math.inf)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def reference(logits: list[float], *, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0) -> list[float]:
    """Token probabilities after temperature, then top-k, then top-p (the smallest set of
    likeliest tokens whose mass reaches top_p; always at least the likeliest)."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k else order)
    probs = softmax([x if i in keep else -math.inf for i, x in enumerate(scaled)])
    nucleus, mass = set(), 0.0
    for i in order:
        if i not in keep or (nucleus and mass >= top_p):
            break
        nucleus.add(i)
        mass += probs[i]
    return softmax([x if i in nucleus else -math.inf for i, x in enumerate(scaled)])


def assert_frequencies(drawn: list[int], probs: list[float]) -> None:
    """Tokens with probability 0 never come; the rest match ``probs`` by chi-square, under a
    bound ~10 standard deviations above its mean (a right sampler passes whatever its seeds; a
    wrong distribution over thousands of draws scores in the hundreds)."""
    counts = Counter(drawn)
    assert {t for t in counts if probs[t] == 0} == set(), (counts, probs)
    n = len(drawn)
    allowed = [t for t, p in enumerate(probs) if p > 0]
    chi2 = sum((counts[t] - n * probs[t]) ** 2 / (n * probs[t]) for t in allowed)
    df = len(allowed) - 1
    bound = df + 10 * math.sqrt(2 * df)
    assert chi2 < bound, (f"chi2 {chi2:.1f} >= {bound:.1f}", dict(sorted(counts.items())),
                          [round(n * p) for p in probs])


# -- Greedy, temperature, top-k, top-p -------------------------------------------------------


def test_greedy_takes_each_rows_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    assert draw(logits.tolist(), seeds=range(64), temperature=0, top_k=3, top_p=0.5) == \
        logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_from_softmax_of_logits_over_t(temperature):
    logits = [0.0, 1.0, -1.0, 0.5, -0.5]
    drawn = draw(logits, temperature=temperature)
    assert_frequencies(drawn, reference(logits, temperature=temperature))


def test_top_k_draws_only_the_k_likeliest():
    logits = [1.0, 2.0, 0.5, 1.8, 1.9, 0.0, 1.2, 1.5]  # top 3 at positions 1, 4, 3
    drawn = draw(logits, temperature=1.0, top_k=3)
    assert set(drawn) == {1, 3, 4}
    assert_frequencies(drawn, reference(logits, top_k=3))


def test_top_p_draws_only_the_nucleus():
    # probabilities 0.05, 0.5, 0.15, 0.3: the nucleus of 0.75 is {1, 3} (0.5 alone falls short)
    logits = [math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]
    drawn = draw(logits, temperature=1.0, top_p=0.75)
    assert set(drawn) == {1, 3}
    assert_frequencies(drawn, reference(logits, top_p=0.75))  # 0.625 / 0.375


def test_top_p_always_keeps_the_likeliest_token():
    logits = [math.log(p) for p in (0.05, 0.9, 0.05)]  # its mass alone exceeds top_p
    assert set(draw(logits, temperature=1.0, top_p=0.5)) == {1}


def test_temperature_then_top_k_then_top_p():
    # Other orders keep other sets here: top-p before temperature keeps {0, 1, 2}, and top-p
    # over all seven tokens rather than the top 4 renormalized keeps {0, ..., 5}.
    logits = [2.0, 1.6, 1.2, 0.8, 0.4, 0.0, -0.4]
    expected = reference(logits, temperature=2.0, top_k=4, top_p=0.85)
    assert [i for i, p in enumerate(expected) if p > 0] == [0, 1, 2, 3]
    assert_frequencies(draw(logits, temperature=2.0, top_k=4, top_p=0.85), expected)


def test_a_rows_draw_depends_on_its_seed_not_its_batch():
    logits = [0.0, 0.3, 0.6, 0.9]
    whole = draw(logits, seeds=range(200), temperature=1.0)
    part = draw(logits, seeds=range(150, 200), temperature=1.0)
    assert part == whole[150:]
    assert len(set(whole)) == 4


# -- Repetition penalty ----------------------------------------------------------------------
# CTRL-style: a seen token's logit is divided by the penalty when positive, multiplied when
# negative, so it always becomes less likely. Seen: in the row's prompt (not its padding) or
# generated so far.

PENALTY = {"repetition_penalty": 2.0, "temperature": 0}


def test_penalty_divides_a_seen_tokens_positive_logit():
    # token 2 at 2.0 becomes 1.0: below 1.5 (token 1), still above 0.9 (token 3)
    logits = [[0.0, 1.5, 2.0, 0.0], [0.0, 0.0, 2.0, 0.9]]
    assert draw(logits, seeds=[0, 1], prompts=[[2], [2]], **PENALTY) == [1, 2]


def test_penalty_multiplies_a_seen_tokens_negative_logit():
    # token 2 at -1.0 becomes -2.0: below -1.5 (token 1), still above -2.5 (token 3)
    logits = [[-5.0, -1.5, -1.0, -5.0], [-5.0, -5.0, -1.0, -2.5]]
    assert draw(logits, seeds=[0, 1], prompts=[[2], [2]], **PENALTY) == [1, 2]


def test_penalized_logits_set_the_sampling_distribution():
    logits = [2.0, 1.0, -1.0, 0.5, -0.5]
    drawn = draw(logits, prompts=[[0, 2]] * SEEDS, repetition_penalty=2.0, temperature=1.0)
    assert_frequencies(drawn, reference([1.0, 1.0, -2.0, 0.5, -0.5]))


def test_penalty_counts_generated_tokens():
    logits = [0.0, 1.5, 2.0, 0.0]
    assert draw(logits, seeds=[0], prompts=[[0]], **PENALTY) == [2]
    assert draw(logits, seeds=[0], prompts=[[0]], generated=[2], **PENALTY) == [1]


def test_penalty_is_per_row():
    logits = [0.0, 1.5, 2.0, 0.0]
    assert draw(logits, seeds=[0, 1], prompts=[[2, 3], [3]], **PENALTY) == [1, 2]


def test_prompt_padding_is_not_seen():
    # Both rows: prompt [3] left-padded with pad id 2 (mask 0). Row 0 shows the pad is not
    # penalized, row 1 that the penalty is on.
    logits = [[0.0, 1.5, 2.0, 0.0], [0.0, 1.5, 0.0, 2.0]]
    assert draw(logits, seeds=[0, 1], prompts=[[3], [3, 3, 3]], pad_id=2, **PENALTY) == [2, 1]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_pad_id_in_the_prompt_is_seen_despite_the_padding(device):
    # The pad id is often EOS, and a chat template writes EOS into the prompt: that token is
    # seen, whatever the padding around it. Many pad positions and rows, because on CUDA a
    # scatter of both "not seen" (padding) and "seen" into one column keeps either one.
    pad = 2
    prompts = [[pad, 3]] * 256 + [[0] * 300]  # the last row pads the others by 299
    logits = [0.0, 1.5, 2.0, 0.0]
    drawn = draw(logits, seeds=range(len(prompts)), prompts=prompts, pad_id=pad, device=device,
                 **PENALTY)
    assert drawn[:-1] == [1] * 256  # token 2 penalized below token 1
    assert drawn[-1] == 2  # a row that never saw token 2
