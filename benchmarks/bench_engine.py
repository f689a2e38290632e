"""Engine vs the tutorial loop, side by side on the same prompts and model.

(a) one prompt at a time through ``model.generate`` (what LLM tutorials show),
(b) fixed-size batches in input order through ``model.generate`` (left padding, attention mask),
(c) the batchgen engine (length-sorted batches under a token budget, finished rows dropped).

Greedy, EOS ignored, exactly ``new_tokens`` per prompt, so every variant does the same work. Two
models: the tiny model, and a GPT-2-small-shaped model with random weights built from its config
(no download). Prints JSON lines: tokens/s per variant, the ratios, and padding efficiency (real
prompt tokens / padded prompt positions computed).

    python benchmarks/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import Timer, emit, log, prompt_lengths, random_prompts, tiny_model


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in batch)
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def tutorial_loop(model, prompts, new_tokens, pad) -> int:
    made = 0
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        made += out.shape[1] - ids.shape[1]
    return made


@torch.inference_mode()
def naive_batches(model, prompts, new_tokens, pad, batch_size) -> tuple[int, int, int]:
    made = real = padded = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ids, mask = left_pad(batch, pad)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        made += (out.shape[1] - ids.shape[1]) * len(batch)
        real += int(mask.sum())
        padded += ids.numel()
    return made, real, padded


def batchgen_engine(model, tokenizer, new_tokens, batch_size):
    from batchgen.engine import Engine
    from batchgen.spec import GenerationSpec

    engine = Engine(model, tokenizer, GenerationSpec(max_new_tokens=new_tokens),
                    max_input_tokens=None, batch_size=batch_size, max_batch_tokens=1 << 30)
    engine.eos_ids = set()  # same work as min_new_tokens in (a) and (b)
    return engine


def bench_model(name, model, tokenizer, prompts, new_tokens, batch_size) -> None:
    from batchgen.engine import Request

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    n_prompt = sum(len(p) for p in prompts)
    log(f"{name}: {len(prompts)} prompts, {n_prompt} prompt tokens, {new_tokens} new each")
    tutorial_loop(model, prompts[:2], 2, pad)  # warm up kernels and allocator

    with Timer() as ta:
        made_a = tutorial_loop(model, prompts, new_tokens, pad)
    with Timer() as tb:
        made_b, real_b, padded_b = naive_batches(model, prompts, new_tokens, pad, batch_size)
    engine = batchgen_engine(model, tokenizer, new_tokens, batch_size)
    with Timer() as tc:
        done = engine.generate([Request(tuple(p), i) for i, p in enumerate(prompts)])
    made_c = sum(c.generated_tokens for c in done)
    assert made_a == made_b == made_c == len(prompts) * new_tokens, (made_a, made_b, made_c)

    tps = {"a_tutorial_loop": made_a / ta.seconds, "b_naive_batches": made_b / tb.seconds,
           "c_batchgen_engine": made_c / tc.seconds}
    for variant, value in tps.items():
        emit(bench="engine", model=name, variant=variant, tokens_per_s=round(value, 1),
             prompts=len(prompts), new_tokens=new_tokens, batch_size=batch_size)
    emit(bench="engine_ratio", model=name, c_over_b=round(tps["c_batchgen_engine"] / tps["b_naive_batches"], 2),
         c_over_a=round(tps["c_batchgen_engine"] / tps["a_tutorial_loop"], 2))
    s = engine.stats
    emit(bench="padding_efficiency", model=name,
         b_naive_batches=round(real_b / padded_b, 3),
         c_batchgen_engine=round(s.prompt_tokens / s.padded_prompt_positions, 3))


def gpt2_small_random(vocab_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # 12 layers, 768 wide, 50257 vocab, 1024 context: GPT-2 small's shape
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = vocab_tokenizer.eos_token_id
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    from batchgen.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    path = tiny_model()
    tok = load_tokenizer(ModelSpec(path=str(path)))  # left padding, pad = EOS, as replicas use it
    tiny = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = 16 if args.quick else 64
    prompts = random_prompts(prompt_lengths(n, seed=1), vocab=len(tok))
    bench_model("tiny", tiny, tok, prompts, new_tokens=32, batch_size=16)

    gpt2 = gpt2_small_random(tok)
    n = 4 if args.quick else 16
    # Token ids from the tiny tokenizer's range: the model is random, only the shapes matter.
    prompts = random_prompts(prompt_lengths(n, seed=2), vocab=len(tok))
    bench_model("gpt2-small-shaped", gpt2, tok, prompts, new_tokens=32, batch_size=8)


if __name__ == "__main__":
    main()
