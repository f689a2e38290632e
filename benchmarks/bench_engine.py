"""Engine vs the tutorial loop and plain ``model.generate``, side by side on the same prompts
and model. Two models: the tiny model, and a GPT-2-small-shaped model with random weights built
from its config (no download); prompts are token ids (the models are random or tiny: only the
shapes matter). Prints JSON lines (``emit``); every ratio is measured within one run.

1. Greedy, EOS ignored, exactly ``new_tokens`` per prompt, so every variant does the same work:
   (a) one prompt at a time through ``model.generate`` (what LLM tutorials show),
   (b) fixed-size batches in input order through ``model.generate`` (left padding, mask),
   (c) the batchgen engine on its default path (``engine.path``), and ``c_hf_path``: the
   engine on its Hugging Face path (length-sorted batches, finished rows dropped).
   Tokens/s, the ratios, padding efficiency (real prompt tokens / prompt positions computed).
2. Synthetic data (what users come for): a ~190-token shared system prompt and few-shot
   examples, a 25-50-token unique part per row, n=4 samples per row at temperature 0.9, 32 new
   tokens, EOS ignored. ``model.generate(num_return_sequences=4)`` over left-padded batches of
   rows vs the engine with the job prefix: tokens/s and their ratio, and prompt positions
   computed per output row.
3. EOS-driven lengths (tiny model, temperature 1.0, up to 96 new tokens; many rows stop early):
   the engine's slot path (continuous admission) vs its Hugging Face path on the same requests:
   tokens/s ratio, and slot occupancy (overall, and while requests waited for a slot).

Other work shares this machine's cores and can slow a run several-fold for seconds at a time, so
the two sides of each new ratio run interleaved (2: the engine between the two halves of the
baseline's batches; 3: alternating rounds), and where there are several rounds each side's best
counts. A ratio record carries its target and whether it was met. Full run: a few minutes;
``--quick`` (smaller and shorter everything): under a minute.

    python benchmarks/bench_engine.py [--quick] [--gpt2-rows 16 --gpt2-rows-per-batch 8]
"""

from __future__ import annotations

import argparse
import random

import torch
from common import (
    Timer, common_token_prefix, cpu_pressure, emit, environment, log, prompt_lengths, random_prompts,
    shared_prefix_prompts, tiny_model
)


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in batch)
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


def hf_generate(model, **kwargs) -> torch.Tensor:
    """``model.generate`` on the model's own attention (the engine's slot path switches it)."""
    from batchgen.engine.attention import use_own

    use_own(model)
    return model.generate(**kwargs)


@torch.inference_mode()
def tutorial_loop(model, prompts, new_tokens, pad) -> int:
    made = 0
    for p in prompts:
        ids = torch.tensor([p])
        out = hf_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids),
                          do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=pad)
        made += out.shape[1] - ids.shape[1]
    return made


@torch.inference_mode()
def naive_batches(model, prompts, new_tokens, pad, batch_size) -> tuple[int, int, int]:
    made = real = padded = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ids, mask = left_pad(batch, pad)
        out = hf_generate(model, input_ids=ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        made += (out.shape[1] - ids.shape[1]) * len(batch)
        real += int(mask.sum())
        padded += ids.numel()
    return made, real, padded


def make_engine(model, tokenizer, gen, batch_size, path="auto", prefix=(),
                max_batch_tokens=1 << 30):
    from batchgen.engine.engine import Engine

    return Engine(model, tokenizer, gen, max_input_tokens=None, batch_size=batch_size,
                  max_batch_tokens=max_batch_tokens, path=path, prefix=prefix)


def timed_generate(engine, requests):
    with Timer() as t:
        done = engine.generate(requests)
    assert not any(c.finish_reason == "error" for c in done), [c.error for c in done if c.error]
    return done, t.seconds


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def rounded(x, digits=3):
    return None if x is None else round(x, digits)


def target_fields(value, target) -> dict:
    return {"target": target, "met": bool(value is not None and value >= target)}


# -- 1. greedy, same work per variant ------------------------------------------------------------

def bench_model(name, model, tokenizer, prompts, new_tokens, batch_size) -> None:
    from batchgen.engine.engine import Request
    from batchgen.spec import GenerationSpec

    pad = pad_id(tokenizer)
    model.eval()
    n_prompt = sum(len(p) for p in prompts)
    log(f"{name}: {len(prompts)} prompts, {n_prompt} prompt tokens, {new_tokens} new each")
    tutorial_loop(model, prompts[:2], 2, pad)  # warm up kernels and allocator

    with Timer() as ta:
        made_a = tutorial_loop(model, prompts, new_tokens, pad)
    with Timer() as tb:
        made_b, real_b, padded_b = naive_batches(model, prompts, new_tokens, pad, batch_size)
    gen = GenerationSpec(max_new_tokens=new_tokens, ignore_eos=True)  # = min_new_tokens above
    requests = [Request(tuple(p), i) for i, p in enumerate(prompts)]
    engine = make_engine(model, tokenizer, gen, batch_size)  # (the load-time probe runs here)
    done_c, seconds_c = timed_generate(engine, requests)
    hf = make_engine(model, tokenizer, gen, batch_size, path="hf")
    done_h, seconds_h = timed_generate(hf, requests)
    made_c = sum(c.generated_tokens for c in done_c)
    made_h = sum(c.generated_tokens for c in done_h)
    assert made_a == made_b == made_c == made_h == len(prompts) * new_tokens, (
        made_a, made_b, made_c, made_h)

    tps = {"a_tutorial_loop": made_a / ta.seconds, "b_naive_batches": made_b / tb.seconds,
           "c_batchgen_engine": made_c / seconds_c, "c_hf_path": made_h / seconds_h}
    for variant, value in tps.items():
        extra = {"path": engine.path} if variant == "c_batchgen_engine" else {}
        emit(bench="engine", model=name, variant=variant, tokens_per_s=round(value, 1),
             prompts=len(prompts), new_tokens=new_tokens, batch_size=batch_size, **extra)
    c = tps["c_batchgen_engine"]
    emit(bench="engine_ratio", model=name, path=engine.path,
         c_over_b=round(c / tps["b_naive_batches"], 2),
         c_over_a=round(c / tps["a_tutorial_loop"], 2),
         c_over_c_hf_path=round(c / tps["c_hf_path"], 2))
    s, h = engine.stats, hf.stats
    emit(bench="padding_efficiency", model=name,
         b_naive_batches=round(real_b / padded_b, 3),
         c_batchgen_engine=round(s.prompt_tokens / s.padded_prompt_positions, 3),
         c_hf_path=round(h.prompt_tokens / h.padded_prompt_positions, 3))


# -- 2. synthetic data: shared prefix, n samples per row -----------------------------------------

SYN_N, SYN_NEW, SYN_TEMPERATURE = 4, 32, 0.9


@torch.inference_mode()
def generate_samples(model, prompts, pad, new_tokens) -> tuple[int, int]:
    """Plain ``model.generate`` with num_return_sequences over one left-padded batch of rows:
    (tokens made, prompt positions computed: the padded width once per returned sequence)."""
    ids, mask = left_pad(prompts, pad)
    out = hf_generate(model, input_ids=ids, attention_mask=mask, do_sample=True,
                      temperature=SYN_TEMPERATURE, num_return_sequences=SYN_N,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    return (out.shape[1] - ids.shape[1]) * out.shape[0], SYN_N * ids.numel()


def bench_synthetic(name, model, tokenizer, rows, rows_per_batch, slots, target, rounds=1,
                    new_tokens=SYN_NEW) -> None:
    """Baseline: ``model.generate`` over batches of ``rows_per_batch`` rows. Engine: one
    ``generate`` call with every (row, sample) request, ``slots`` slots, the job prefix given
    (prefilled on the engine's first call, counted in its time). Per round the engine runs
    between the two halves of the baseline's batches, so load from other work on the shared
    cores falls on both sides alike; with several rounds each side's best round counts."""
    from batchgen.engine.engine import Request
    from batchgen.spec import GenerationSpec

    pad = pad_id(tokenizer)
    model.eval()
    _, prompts = shared_prefix_prompts(rows, vocab=len(tokenizer), seed=3)
    prefix = common_token_prefix(prompts)
    outputs = rows * SYN_N
    own = sum(len(p) - len(prefix) for p in prompts)
    log(f"{name} synthetic: {rows} rows x n={SYN_N}, prefix {len(prefix)} tokens, "
        f"{own / rows:.1f} own tokens per row, {new_tokens} new each, {rounds} round(s)")
    hf_generate(model, input_ids=torch.tensor([prompts[0][:8]]), do_sample=True,
                max_new_tokens=2, pad_token_id=pad)  # warm-up
    gen = GenerationSpec(max_new_tokens=new_tokens, temperature=SYN_TEMPERATURE, n=SYN_N,
                         ignore_eos=True)
    requests = [Request(tuple(p), 1 + r * SYN_N + k) for r, p in enumerate(prompts)
                for k in range(SYN_N)]
    batches = [prompts[a:a + rows_per_batch] for a in range(0, rows, rows_per_batch)]
    half = (len(batches) + 1) // 2

    def baseline(part):
        made = positions = 0
        with Timer() as t:
            for batch in part:
                m, p = generate_samples(model, batch, pad, new_tokens)
                made, positions = made + m, positions + p
        return made, positions, t.seconds

    torch.manual_seed(0)
    times_g, times_e = [], []
    for _ in range(rounds):
        made_g, positions_g, first = baseline(batches[:half])
        # A fresh engine per round: the job prefix is prefilled once per engine, in its time.
        engine = make_engine(model, tokenizer, gen, slots, prefix=prefix, max_batch_tokens=32768)
        done, seconds_e = timed_generate(engine, requests)
        made, positions, second = baseline(batches[half:])
        made_g, positions_g = made_g + made, positions_g + positions
        times_g.append(first + second)
        times_e.append(seconds_e)
    made_e = sum(d.generated_tokens for d in done)
    assert made_g == made_e == outputs * new_tokens, (made_g, made_e)
    seconds_g, seconds_e = min(times_g), min(times_e)

    tps_g, tps_e = made_g / seconds_g, made_e / seconds_e
    common = {"model": name, "rows": rows, "n": SYN_N, "new_tokens": new_tokens,
              "rounds": rounds, "prefix_tokens": len(prefix),
              "own_tokens_per_row": round(own / rows, 1)}
    emit(bench="synthetic_data", variant="hf_generate", tokens_per_s=round(tps_g, 1),
         seconds=round(seconds_g, 1), rows_per_batch=rows_per_batch,
         sequences_per_batch=rows_per_batch * SYN_N, **common)
    emit(bench="synthetic_data", variant="batchgen_engine", path=engine.path,
         tokens_per_s=round(tps_e, 1), seconds=round(seconds_e, 1), slots=slots, **common)
    ratio = tps_e / tps_g
    emit(bench="synthetic_ratio", model=name, path=engine.path,
         engine_over_generate=round(ratio, 2), **target_fields(ratio, target))
    s = engine.stats
    emit(bench="prefill_positions_per_output_row", model=name, path=engine.path,
         hf_generate=round(positions_g / outputs, 1),
         batchgen_engine=round(s.padded_prompt_positions / outputs, 1),
         engine_prefix_positions=s.prefix_positions,
         ideal=round((len(prefix) + own) / outputs, 1),
         note="ideal: the shared prefix once, each row's own tokens once (not once per sample)")


# -- 3. EOS-driven lengths: continuous admission vs length-sorted batches ------------------------

def eos_prompts(tokenizer, count, seed=0) -> list[list[int]]:
    """Half real prompts the tiny model knows (chat turns and sentence stems: it answers in
    about 10 tokens and writes <|end|>), half random ids of 64-256 tokens (it wanders on, some
    rows to the limit): lengths from 1 token to max_new_tokens."""
    from batchgen.tinymodel import _OBJECTS, _SUBJECTS, _TOPICS, _VERBS

    rng = random.Random(seed)
    vocab = len(tokenizer)
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            text = (f"<|user|>\nWrite one sentence about {rng.choice(_TOPICS)}.<|end|>\n"
                    f"<|assistant|>\n")
        elif kind < 0.5:
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS)]
            if rng.random() < 0.5:
                words.append(rng.choice(_OBJECTS))
            text = " ".join(words).capitalize()
        else:
            out.append([rng.randrange(16, vocab) for _ in range(rng.randint(64, 256))])
            continue
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def bench_eos(name, model, tokenizer, count, slots, rounds, new_tokens=96) -> None:
    """The same requests through the engine's slot path and its Hugging Face path, ``rounds``
    times, alternating which goes first; each side's best time counts (other work on the shared
    cores only ever slows a run down)."""
    from batchgen.engine.engine import Request
    from batchgen.spec import GenerationSpec

    model.eval()
    prompts = eos_prompts(tokenizer, count)
    requests = [Request(tuple(p), 7 + i) for i, p in enumerate(prompts)]
    gen = GenerationSpec(max_new_tokens=new_tokens, temperature=1.0)
    log(f"{name} eos: {count} requests, {slots} slots, up to {new_tokens} new tokens, "
        f"{rounds} rounds")
    engines = {"hf": make_engine(model, tokenizer, gen, slots, path="hf", max_batch_tokens=32768),
               "slots": make_engine(model, tokenizer, gen, slots, max_batch_tokens=32768)}
    times: dict[str, list[float]] = {"hf": [], "slots": []}
    done: dict[str, list] = {}
    for r in range(rounds):
        for side in (("hf", "slots") if r % 2 == 0 else ("slots", "hf")):
            done[side], seconds = timed_generate(engines[side], requests)
            times[side].append(seconds)
    engine = engines["slots"]
    lengths = sorted(c.generated_tokens for c in done["slots"])
    made_s = sum(lengths)
    made_h = sum(c.generated_tokens for c in done["hf"])
    same = sum(a.token_ids == b.token_ids for a, b in zip(done["slots"], done["hf"]))
    tps_s, tps_h = made_s / min(times["slots"]), made_h / min(times["hf"])
    common = {"model": name, "requests": count, "slots": slots, "max_new_tokens": new_tokens,
              "rounds": rounds}
    emit(bench="eos_workload", variant="hf_path", tokens_per_s=round(tps_h, 1),
         generated_tokens=made_h, seconds=[round(t, 2) for t in times["hf"]], **common)
    emit(bench="eos_workload", variant="batchgen_engine", path=engine.path,
         tokens_per_s=round(tps_s, 1), generated_tokens=made_s,
         seconds=[round(t, 2) for t in times["slots"]],
         stopped=sum(c.finish_reason == "stop" for c in done["slots"]),
         at_limit=sum(n == new_tokens for n in lengths),
         length_p10_p50_p90=[lengths[len(lengths) * q // 10] for q in (1, 5, 9)],
         same_tokens_as_hf_path=same, **common)
    ratio = tps_s / tps_h
    emit(bench="eos_ratio", model=name, path=engine.path, engine_over_hf_path=round(ratio, 2),
         **target_fields(ratio, 1.3))
    s = engine.stats
    emit(bench="eos_occupancy", model=name, path=engine.path,
         busy_occupancy=rounded(s.busy_occupancy), occupancy=rounded(s.occupancy),
         decode_steps_per_round=s.decode_steps // rounds,
         hf_path_decode_steps_per_round=engines["hf"].stats.decode_steps // rounds,
         **target_fields(s.busy_occupancy, 0.9),
         note="busy_occupancy: live rows / slots while requests waited for a slot; "
              "occupancy: over all decode steps, the queue's drain included")


def gpt2_small_random(vocab_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # 12 layers, 768 wide, 50257 vocab, 1024 context: GPT-2 small's shape
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = vocab_tokenizer.eos_token_id
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run, < 1 min)")
    ap.add_argument("--gpt2-rows", type=int, default=0,
                    help="rows of the synthetic-data workload on the GPT-2 shape (default 8)")
    ap.add_argument("--gpt2-rows-per-batch", type=int, default=0,
                    help="rows per model.generate batch there (default 4: 16 sequences)")
    ap.add_argument("--only", choices=["greedy", "synthetic", "eos"],
                    help="one section (default: all)")
    args = ap.parse_args()
    pressure_start = cpu_pressure()
    quick = args.quick
    run = (lambda section: args.only in (None, section))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    from batchgen.engine.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    path = tiny_model()
    tok = load_tokenizer(ModelSpec(path=str(path)))  # left padding, pad = EOS, as replicas use it
    tiny = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gpt2 = gpt2_small_random(tok)

    if run("greedy"):
        with Timer() as t:
            n = 8 if quick else 64
            prompts = random_prompts(prompt_lengths(n, seed=1), vocab=len(tok))
            bench_model("tiny", tiny, tok, prompts, new_tokens=32, batch_size=16)
        log(f"tiny greedy: {t.seconds:.1f}s")
        with Timer() as t:
            n = 2 if quick else 16
            # Token ids from the tiny tokenizer's range: the model is random, only shapes matter.
            prompts = random_prompts(prompt_lengths(n, seed=2), vocab=len(tok))
            bench_model("gpt2-small-shaped", gpt2, tok, prompts, new_tokens=8 if quick else 32,
                        batch_size=8)
        log(f"gpt2 greedy: {t.seconds:.1f}s")
    if run("synthetic"):
        with Timer() as t:
            bench_synthetic("tiny", tiny, tok, rows=16 if quick else 64, rows_per_batch=8,
                            slots=64, target=1.5, rounds=1 if quick else 3)
        log(f"tiny synthetic: {t.seconds:.1f}s")
        with Timer() as t:
            rows = args.gpt2_rows or (2 if quick else 8)
            per_batch = args.gpt2_rows_per_batch or (1 if quick else 4)
            bench_synthetic("gpt2-small-shaped", gpt2, tok, rows=rows, rows_per_batch=per_batch,
                            slots=min(64, rows * SYN_N), target=3.0,
                            new_tokens=8 if quick else SYN_NEW)
        log(f"gpt2 synthetic: {t.seconds:.1f}s")
    if run("eos"):
        with Timer() as t:
            bench_eos("tiny", tiny, tok, count=64 if quick else 256, slots=16 if quick else 32,
                      rounds=1 if quick else 3)
        log(f"tiny eos: {t.seconds:.1f}s")
    environment(pressure_start)


if __name__ == "__main__":
    main()
