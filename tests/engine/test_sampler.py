"""The sampler on hand-made logits: which tokens each setting allows, and how often each comes;
and its counter-based noise: a pure function of (seed, step, token), Gumbel-distributed.

Rows differ only through their seeds, so one call over thousands of seeds draws thousands of
independent samples. The expected distributions come from a plain-Python reference
(temperature, then top-k, then top-p, as Hugging Face applies them), and frequencies are compared
with Pearson's chi-square under a fixed, generous bound; the seeds are fixed, so every run draws
the same tokens.

Only ``make_sampler`` and ``draw`` know the sampler's interface; retarget them when it changes.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from batchgen.engine.sampling import (
    SAMPLER_VERSION, Sampler, _noise_bits, gumbel_noise, mark_seen, seen_from_prompts
)
from batchgen.spec import GenerationSpec

SEEDS = 4000  # samples per distribution: 120+ expected draws for every token allowed below
CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])
DEVICES = ["cpu", CUDA]


def make_sampler(**generation) -> Sampler:
    return Sampler(GenerationSpec(max_new_tokens=16, **generation))


def draw(logits, *, seeds=range(SEEDS), prompts=None, generated=(), step=None, device="cpu",
         **generation) -> list[int]:
    """The token each row picks, all rows in one batch, one seed per row.

    ``logits``: one row shared by every seed, or one row per seed. ``prompts``: each row's
    prompt ids, real tokens only (default: empty). ``generated``: tokens every row produced in
    earlier steps; the step is their count unless ``step`` is given. ``generation``:
    GenerationSpec fields."""
    seeds = torch.tensor(list(seeds), dtype=torch.int64, device=device)
    rows = len(seeds)
    logits = torch.tensor(logits, dtype=torch.float32, device=device)
    if logits.dim() == 1:
        logits = logits.repeat(rows, 1)
    prompts = prompts if prompts is not None else [[] for _ in range(rows)]
    seen = seen_from_prompts(logits.shape[-1], prompts, device)
    every_row = torch.arange(rows, device=device)
    for token in generated:
        mark_seen(seen, every_row, torch.full((rows,), token, dtype=torch.int64, device=device))
    steps = torch.full((rows,), len(generated) if step is None else step, dtype=torch.int64,
                      device=device)
    tokens = make_sampler(**generation).choose(logits, seeds, steps, seen)
    assert tokens.dtype == torch.int64 and tokens.device == logits.device
    return tokens.tolist()


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
    # Ragged prompts [3] and [3, 3, 3]: the engine pads the short one (say with id 2), but only
    # real tokens reach seen_from_prompts. Row 0 shows the pad is not penalized, row 1 that the
    # penalty is on.
    logits = [[0.0, 1.5, 2.0, 0.0], [0.0, 1.5, 0.0, 2.0]]
    assert draw(logits, seeds=[0, 1], prompts=[[3], [3, 3, 3]], **PENALTY) == [2, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_pad_id_in_the_prompt_is_seen_despite_the_padding(device):
    # The pad id is often EOS, and a chat template writes EOS into the prompt: that token is
    # seen, whatever the padding around it. Many duplicate writes into one column, because on
    # CUDA a scatter of both "not seen" (padding) and "seen" into one column keeps either one:
    # seen_from_prompts writes only True.
    pad = 2
    prompts = [[pad, 3]] * 256 + [[0] * 300]  # the last row is long, the others would be padded
    logits = [0.0, 1.5, 2.0, 0.0]
    drawn = draw(logits, seeds=range(len(prompts)), prompts=prompts, device=device, **PENALTY)
    assert drawn[:-1] == [1] * 256  # token 2 penalized below token 1
    assert drawn[-1] == 2  # a row that never saw token 2


def test_seen_must_match_the_logits_width():
    sampler = make_sampler(temperature=1.0, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="seen has shape"):
        sampler.choose(torch.zeros(2, 5), torch.arange(2), torch.zeros(2, dtype=torch.int64),
                       torch.zeros(2, 4, dtype=torch.bool))


# -- The noise: a pure function of (seed, step, token) -----------------------------------------

M32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer in plain Python, the reference for the tensor version."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def reference_bits(seed: int, step: int, token: int) -> int:
    key = fmix32(fmix32(fmix32((seed & M32) ^ 0x9E3779B9) ^ (seed >> 32)) ^ (step & M32))
    return fmix32(key ^ fmix32(token ^ 0x7F4A7C15))


def reference_noise(seed: int, step: int, token: int) -> float:
    v = min((reference_bits(seed, step, token) + 0.5) / 2**32, 1 - 2**-24)
    return -math.log(-math.log1p(-v))


def test_noise_golden_values():
    # The stream itself, pinned: a change here changes every sampled text, so it must come with
    # a bump of SAMPLER_VERSION (and new golden values).
    assert SAMPLER_VERSION == 2
    seeds, steps = [0, 1, 2**63 - 1, 12345678901234], [0, 0, 7, 3]
    golden_bits = [[3932442668, 470839713, 2844917748], [3750619444, 2968756260, 1046995938],
                   [359523954, 1984756511, 579338071], [100430442, 3077165798, 2489784554]]
    golden_noise = [[-0.90507072, 2.15318632, -0.08235957], [-0.72542590, -0.16136844, 1.27506304],
                    [2.43702650, 0.47786623, 1.93173981], [3.74392676, -0.23142663, 0.14296763]]
    s, t = torch.tensor(seeds), torch.tensor(steps)
    assert _noise_bits(s, t, 3).tolist() == golden_bits
    assert [[reference_bits(a, b, k) for k in range(3)] for a, b in zip(seeds, steps)] == golden_bits
    noise = gumbel_noise(s, t, 3)
    assert noise.dtype == torch.float32
    flat = [x for row in golden_noise for x in row]
    assert noise.flatten().tolist() == pytest.approx(flat, abs=1e-6)  # floats: within an ulp
    assert [reference_noise(a, b, k) for a, b in zip(seeds, steps) for k in range(3)] == \
        pytest.approx(flat, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_noise_is_bitwise_the_same_alone_and_in_any_batch(device):
    seeds = torch.tensor([5, 2**40 + 3, 0, 2**63 - 1, 77, 5, 5, 123456789], device=device)
    steps = torch.tensor([0, 3, 9, 1, 2**31, 1, 2, 0], device=device)
    batch = gumbel_noise(seeds, steps, 1000)
    assert batch.shape == (8, 1000) and batch.device == seeds.device
    assert torch.isfinite(batch).all()
    for row in range(8):
        alone = gumbel_noise(seeds[row:row + 1], steps[row:row + 1], 1000)
        assert torch.equal(alone[0], batch[row])
    order = torch.tensor([7, 2, 5, 0, 3, 6, 1, 4], device=device)
    assert torch.equal(gumbel_noise(seeds[order], steps[order], 1000), batch[order])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_bits_are_the_same_on_cpu_and_cuda():
    seeds = torch.tensor([0, 1, 2**63 - 1, 2**32, 987654321987])
    steps = torch.tensor([0, 1, 2, 2**31 + 5, 40])
    cpu = _noise_bits(seeds, steps, 50257)
    assert torch.equal(_noise_bits(seeds.cuda(), steps.cuda(), 50257).cpu(), cpu)
    assert torch.allclose(gumbel_noise(seeds.cuda(), steps.cuda(), 50257).cpu(),
                          gumbel_noise(seeds, steps, 50257), rtol=1e-5, atol=1e-6)


def test_noise_differs_across_steps_seeds_and_seed_halves():
    vocab = 50257
    variants = {
        "base": (0, 0), "next step": (0, 1), "next seed": (1, 0),
        "high half": (2**32, 0), "both halves": (2**32 + 1, 0), "far step": (0, 2**31 + 1),
    }
    noise = {name: gumbel_noise(torch.tensor([seed]), torch.tensor([step]), vocab)[0]
             for name, (seed, step) in variants.items()}
    names = list(noise)
    for i, a in enumerate(names):
        assert torch.isfinite(noise[a]).all()
        assert len(noise[a].unique()) > vocab * 0.99, a  # tokens of one row do not repeat
        for b in names[i + 1:]:
            same = (noise[a] == noise[b]).float().mean().item()
            assert same < 1e-3, (a, b, same)


def test_noise_is_gumbel_with_uniform_bits():
    # ~1e6 values over 20 rows of consecutive seeds and steps.
    rows, vocab = 20, 50000
    seeds = torch.arange(rows, dtype=torch.int64) + 1000
    steps = torch.arange(rows, dtype=torch.int64) % 3
    g = gumbel_noise(seeds, steps, vocab).double()
    assert torch.isfinite(g).all()
    n = g.numel()
    # Gumbel(0, 1): mean = Euler-Mascheroni, variance = pi^2 / 6 (sd of the estimates ~0.0013
    # and ~0.0034 here)
    assert g.mean().item() == pytest.approx(0.5772157, abs=0.01)
    assert g.var().item() == pytest.approx(math.pi**2 / 6, abs=0.03)
    # The right tail, where the argmax is decided: P(g > 5) = 1 - exp(-exp(-5))
    tail, p = (g > 5).sum().item(), 1 - math.exp(-math.exp(-5))
    assert abs(tail - n * p) < 6 * math.sqrt(n * p), (tail, n * p)
    # u = exp(-exp(-g)) is uniform on (0, 1): chi-square over 64 bins
    u = torch.exp(-torch.exp(-g))
    counts = torch.bincount((u * 64).long().clamp(max=63).flatten(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 63 + 10 * math.sqrt(2 * 63), chi2
    # Neighbouring seeds and neighbouring steps are uncorrelated (sd ~0.0045 per pair of rows)
    centered = (g - g.mean()) / g.std()
    for a, b in [(0, 1), (1, 2), (5, 6), (0, 3)]:
        assert abs((centered[a] * centered[b]).mean().item()) < 0.03, (a, b)


# -- Batch independence, seen, tracing ---------------------------------------------------------

SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("generation", [{"temperature": 0, "repetition_penalty": 1.3}, SAMPLED],
                         ids=["greedy", "sampled"])
def test_a_rows_token_is_the_same_alone_and_in_a_batch_of_7_others(device, generation):
    vocab = 500
    torch.manual_seed(0)
    logits = (torch.randn(8, vocab) * 2).to(device)
    seeds = torch.tensor([3, 2**50, 17, 2**63 - 1, 0, 999, 3, 42], device=device)
    steps = torch.tensor([0, 5, 1, 2, 0, 11, 1, 7], device=device)
    prompts = [list(range(r, 300, 7 + r)) for r in range(8)]
    seen = seen_from_prompts(vocab, prompts, device)
    sampler = make_sampler(**generation)
    batch = sampler.choose(logits, seeds, steps, seen)
    alone = [sampler.choose(logits[r:r + 1], seeds[r:r + 1], steps[r:r + 1], seen[r:r + 1])
             for r in range(8)]
    assert torch.cat(alone).tolist() == batch.tolist()


def test_draws_at_a_later_step_follow_the_same_distribution():
    logits = [0.0, 1.0, -1.0, 0.5, -0.5]
    first, later = draw(logits, temperature=1.0), draw(logits, step=1000, temperature=1.0)
    assert sum(a != b for a, b in zip(first, later)) > SEEDS // 2  # fresh noise at each step
    assert_frequencies(later, reference(logits))


@pytest.mark.parametrize("device", DEVICES)
def test_mark_seen_with_duplicate_indices_only_sets_true(device):
    seen = torch.zeros(3, 10, dtype=torch.bool, device=device)
    seen[1, 4] = True  # seen before: a write of the same cell must not clear it
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2] * 50, device=device)
    tokens = torch.tensor([2, 2, 9, 4, 4, 0, 0, 0, 5] * 50, device=device)
    mark_seen(seen, rows, tokens)
    expected = {(0, 2), (0, 9), (1, 4), (2, 0), (2, 5)}
    assert {tuple(ix) for ix in seen.nonzero().tolist()} == expected


@pytest.mark.parametrize("device", DEVICES)
def test_seen_from_prompts_with_pad_equal_to_eos_in_the_prompt(device):
    eos = pad = 2  # callers pass real tokens only, but EOS itself may come many times
    prompts = [[eos, 5, eos, eos], [], [7] * 500 + [pad], [0, 1, 2, 3, 4, 5, 6, 7]]
    seen = seen_from_prompts(8, prompts, device)
    assert seen.shape == (4, 8) and seen.dtype == torch.bool and seen.device.type == device
    assert [sorted(set(p)) for p in prompts] == [row.nonzero().flatten().tolist() for row in seen]
    assert seen_from_prompts(8, [], device).shape == (0, 8)
    with pytest.raises(ValueError, match="token ids"):
        seen_from_prompts(8, [[1, 8]], device)


@pytest.mark.slow  # torch.compile's tracing alone takes seconds on two busy cores
@pytest.mark.parametrize("generation", [SAMPLED, {"temperature": 0, "repetition_penalty": 1.3}],
                         ids=["sampled", "greedy"])
def test_choose_traces_as_one_graph(generation):
    # fullgraph=True fails on any graph break: a host sync (.item(), .tolist(), a branch on a
    # tensor's value) in choose, gumbel_noise or mark_seen would be one.
    import torch._dynamo

    sampler = make_sampler(**generation)

    def sampler_choose_fn(logits, seeds, steps, seen):
        tokens = sampler.choose(logits, seeds, steps, seen)
        mark_seen(seen, torch.arange(len(tokens), device=tokens.device), tokens)
        return tokens

    torch._dynamo.reset()
    compiled = torch.compile(sampler_choose_fn, fullgraph=True, backend="eager")
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    seeds, steps = torch.tensor([1, 2, 3, 2**62]), torch.tensor([0, 4, 1, 9])
    seen = seen_from_prompts(300, [[1, 2], [], [5] * 3, [299]], "cpu")
    seen_eager = seen.clone()
    tokens = compiled(logits, seeds, steps, seen)
    assert tokens.tolist() == sampler_choose_fn(logits, seeds, steps, seen_eager).tolist()
    assert torch.equal(seen, seen_eager)
