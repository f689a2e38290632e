"""The engine on a GPU, in bf16: tokens/s at batch 1, 16, 64, 256 against the memory-bandwidth
limit of decode, and against transformers' own continuous batching (``generate_batch``).

Not part of ``make bench`` (CI and this project's machines have no GPU); run it where one is:
    python benchmarks/bench_gpu.py [--model llama-1b|gpt2] [--quick]

The model is Llama-3.2-1B-shaped with random weights (no download): what matters is the bytes a
decode step reads. A decode step of batch B reads every weight once plus the KV cache of the B
sequences, so at best it takes (weight bytes + KV bytes) / bandwidth; the limit in tokens/s is B
over that. Bandwidth is measured here (a device-to-device copy; bytes read + written), and the
decode rate is isolated from prefill by timing each batch twice, with two lengths of output:
decode tok/s = B x (long - short) / (t_long - t_short). Each batch size runs once untimed first,
since a replica in a long job runs warm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit, log  # noqa: E402

PROMPT = 128
SHORT, LONG = 16, 144


def measured_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    n = 1 << 30  # 1 GiB per buffer
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * reps / seconds


def build_model(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config()
    else:  # Llama-3.2-1B's shape
        config = LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0,
        )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    return model.eval(), config


def kv_bytes_per_token(config) -> int:
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 2 * layers * kv_heads * (hidden // heads) * 2  # K and V, bf16


def engine_seconds(model, tokenizer, prompts, new_tokens, batch):
    from batchgen.engine import Engine, Request
    from batchgen.spec import GenerationSpec

    engine = Engine(model, tokenizer, GenerationSpec(max_new_tokens=new_tokens, ignore_eos=True),
                    max_input_tokens=None, batch_size=batch, max_batch_tokens=1 << 30)
    requests = [Request(tuple(p), i) for i, p in enumerate(prompts)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.generate(requests)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    made = sum(c.generated_tokens for c in done)
    assert made == len(prompts) * new_tokens, (made, len(prompts), new_tokens)
    return seconds


def generate_batch_seconds(model, prompts, new_tokens):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=cfg)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    made = sum(len(r.generated_tokens) for r in out.values())
    return seconds, made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=["llama-1b", "gpt2"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", default="1,16,64,256")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    from batchgen.tinymodel import build_tiny_model
    from batchgen.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    tok_dir = build_tiny_model(Path("/tmp/bg-tiny-tokenizer"))
    tokenizer = load_tokenizer(ModelSpec(path=str(tok_dir)))  # only its pad/eos ids are used

    bandwidth = measured_bandwidth()
    device = torch.cuda.get_device_name()
    emit(bench="gpu_bandwidth", device=device, copy_bytes_per_s=round(bandwidth / 1e9, 1),
         unit="GB/s (read + write)")
    model, config = build_model(args.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_tok = kv_bytes_per_token(config)
    log(f"{args.model}: {weight_bytes / 1e9:.2f} GB of weights, {kv_tok} KV bytes per token")
    g = torch.Generator().manual_seed(0)

    def prompts_for(count):
        return torch.randint(16, config.vocab_size, (count, PROMPT), generator=g).tolist()

    engine_seconds(model, tokenizer, prompts_for(4), 4, 4)  # warm-up: kernels, allocator
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(batch)
        # Untimed first pass: the first time a KV length is seen costs ~60 ms a step here
        # (allocator growth, per-shape setup); a replica in a long job runs warm.
        engine_seconds(model, tokenizer, prompts, LONG, batch)
        t_short = engine_seconds(model, tokenizer, prompts, SHORT, batch)
        t_long = engine_seconds(model, tokenizer, prompts, LONG, batch)
        decode_tps = batch * (LONG - SHORT) / (t_long - t_short)
        # The bandwidth limit at the mean context of the decode steps measured.
        mean_ctx = PROMPT + (SHORT + LONG) / 2
        step_bytes = weight_bytes + batch * mean_ctx * kv_tok
        limit_tps = batch * bandwidth / step_bytes
        record = dict(bench="gpu_engine", device=device, model=args.model, dtype="bfloat16",
                      batch=batch, prompt_tokens=PROMPT, new_tokens=LONG,
                      end_to_end_tokens_per_s=round(batch * LONG / t_long, 1),
                      decode_tokens_per_s=round(decode_tps, 1),
                      bandwidth_limit_tokens_per_s=round(limit_tps, 1),
                      fraction_of_limit=round(decode_tps / limit_tps, 3))
        try:
            if args.quick and batch > 16:
                raise RuntimeError("skipped in --quick")
            generate_batch_seconds(model, prompts[: min(4, batch)], 4)  # its own warm-up
            t_cb, made = generate_batch_seconds(model, prompts, LONG)
            record["generate_batch_tokens_per_s"] = round(made / t_cb, 1)
            record["engine_over_generate_batch"] = round(
                (batch * LONG / t_long) / (made / t_cb), 2)
        except Exception as e:  # noqa: BLE001 - report, keep measuring the engine
            record["generate_batch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        emit(**record)


if __name__ == "__main__":
    main()
