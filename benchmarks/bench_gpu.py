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

Engine v2: each batch runs with CUDA graphs (the default) and with ``cuda_graphs=False``; the
record has both decode rates, milliseconds per decode step (wall; at batch 1 it bounds the host
time of a step), graphs captured and their capture seconds, the memory reserved by the first
run (slot cache + graph pool), and how many rows the graphed run gives exactly as the eager one.
``gpu_invariance``: the share of rows of the largest batch whose tokens are the same alone.
Checked on CPU only (tiny model, graphs off, ``torch.cuda`` stubbed): not yet run on a GPU.
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


_ENGINES: dict = {}
_PROMPTS: dict[int, list] = {}  # the prompts of each batch size, for the invariance check


def engine_for(model, tokenizer, new_tokens, batch, graphs=True):
    """One engine per (batch, graphs), kept: its slot state and captured graphs are reused, as
    in a replica that runs shard after shard."""
    from batchgen.engine.engine import Engine
    from batchgen.spec import GenerationSpec

    key = (batch, graphs)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = Engine(
            model, tokenizer, GenerationSpec(max_new_tokens=LONG, ignore_eos=True),
            max_input_tokens=None, batch_size=batch, max_batch_tokens=1 << 30,
            cuda_graphs=graphs)
    engine.gen = GenerationSpec(max_new_tokens=new_tokens, ignore_eos=True)
    return engine


def engine_run(model, tokenizer, prompts, new_tokens, batch, graphs=True):
    from batchgen.engine.engine import Request

    engine = engine_for(model, tokenizer, new_tokens, batch, graphs)
    requests = [Request(tuple(p), i) for i, p in enumerate(prompts)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.generate(requests)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    made = sum(c.generated_tokens for c in done)
    assert made == len(prompts) * new_tokens, (made, len(prompts), new_tokens)
    return seconds, [c.token_ids for c in done], engine


def engine_seconds(model, tokenizer, prompts, new_tokens, batch, graphs=True):
    return engine_run(model, tokenizer, prompts, new_tokens, batch, graphs)[0]


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
    from batchgen.engine.loading import load_tokenizer
    from batchgen.spec import ModelSpec
    from batchgen.tinymodel import build_tiny_model

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
        made = torch.randint(16, config.vocab_size, (count, PROMPT), generator=g).tolist()
        _PROMPTS[count] = made
        return made

    engine_seconds(model, tokenizer, prompts_for(4), 4, 4)  # warm-up: kernels, allocator
    rows: dict[int, list] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(batch)
        record = dict(bench="gpu_engine", device=device, model=args.model, dtype="bfloat16",
                      batch=batch, prompt_tokens=PROMPT, new_tokens=LONG)
        for graphs in (True, False):
            # Untimed first pass: graphs are captured, the slot cache allocated.
            reserved = torch.cuda.memory_reserved()
            _, tokens, engine = engine_run(model, tokenizer, prompts, LONG, batch, graphs)
            t_short = engine_seconds(model, tokenizer, prompts, SHORT, batch, graphs)
            t_long, tokens_again, _ = engine_run(model, tokenizer, prompts, LONG, batch, graphs)
            decode_tps = batch * (LONG - SHORT) / (t_long - t_short)
            tag = "" if graphs else "_eager"
            record[f"decode_tokens_per_s{tag}"] = round(decode_tps, 1)
            record[f"ms_per_decode_step{tag}"] = round(1000 * (t_long - t_short) / (LONG - SHORT), 3)
            record[f"end_to_end_tokens_per_s{tag}"] = round(batch * LONG / t_long, 1)
            if graphs:
                g = engine.graphs
                rows[batch] = tokens
                record.update(path=engine.path, graphs_enabled=bool(g and g.enabled),
                              graph_failure=g.failure if g else "no graphs",
                              graphs_captured=len(g.graphs) if g else 0,
                              capture_seconds=round(g.capture_seconds, 2) if g else None,
                              reserved_bytes_first_run=torch.cuda.memory_reserved() - reserved,
                              graphed_rows_same_on_rerun=sum(
                                  a == b for a, b in zip(tokens, tokens_again)))
            else:
                record["graph_rows_equal_to_eager"] = sum(
                    a == b for a, b in zip(rows[batch], tokens))
        # The bandwidth limit at the mean context of the decode steps measured.
        mean_ctx = PROMPT + (SHORT + LONG) / 2
        step_bytes = weight_bytes + batch * mean_ctx * kv_tok
        limit_tps = batch * bandwidth / step_bytes
        record.update(bandwidth_limit_tokens_per_s=round(limit_tps, 1),
                      fraction_of_limit=round(record["decode_tokens_per_s"] / limit_tps, 3))
        try:
            if args.quick and batch > 16:
                raise RuntimeError("skipped in --quick")
            generate_batch_seconds(model, prompts[: min(4, batch)], 4)  # its own warm-up
            t_cb, made = generate_batch_seconds(model, prompts, LONG)
            record["generate_batch_tokens_per_s"] = round(made / t_cb, 1)
            record["engine_over_generate_batch"] = round(
                record["end_to_end_tokens_per_s"] / (made / t_cb), 2)
        except Exception as e:  # noqa: BLE001 - report, keep measuring the engine
            record["generate_batch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        emit(**record)
    # Batch invariance in bf16: the first rows of the largest batch, each alone at batch 1.
    largest = max(rows)
    if largest > 1:
        check = min(32, largest)
        alone = []
        for i in range(check):
            p = _PROMPTS[largest][i]
            alone.append(engine_run(model, tokenizer, [p], LONG, 1)[1][0])
        same = sum(a == b for a, b in zip(alone, rows[largest][:check]))
        emit(bench="gpu_invariance", device=device, model=args.model, dtype="bfloat16",
             rows=check, batch=largest, rows_bitwise_equal_alone=same,
             share=round(same / check, 3))


if __name__ == "__main__":
    main()
