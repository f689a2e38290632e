"""System overhead and replica scaling, side by side in one run.

The same rows, prompts and generation settings (greedy, ignore_eos, a fixed number of new tokens):
  engine       the batchgen engine called directly in this process (2 torch threads),
  run/1x2      the full `batchgen run` path: Ray, Parquet in, storage out, commits; 1 replica x 2 CPU,
  run/2x1      the same with 2 replicas x 1 CPU.
Tokens/s are reported two ways: over the whole wall time (Ray start and model loads included),
and over the time from the first to the last committed shard (steady state).

    python benchmarks/bench_system.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import Timer, cpu_pressure, emit, environment, log, tiny_model

TOPICS = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music"]


def make_input(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i:05d}" for i in range(rows)],
                             "topic": [TOPICS[i % len(TOPICS)] for i in range(rows)]}), path)


def spec_for(inp: Path, out: Path, model: Path, replicas: int, cpus: int, new_tokens: int):
    from batchgen.spec.load import parse_spec

    return parse_spec({
        "input": {"path": str(inp), "template": "The {{ topic }} and the", "id_column": "id"},
        "model": {"path": str(model)},
        "generation": {"max_new_tokens": new_tokens, "ignore_eos": True},
        "output": {"path": str(out)},
        "resources": {"replicas": replicas, "cpus_per_replica": cpus, "shard_rows": 64,
                      "batch_size": 32},
    })


def engine_direct(spec) -> tuple[int, float, float]:
    import torch

    from batchgen.engine.engine import Engine, Request
    from batchgen.io.inputs import read_rows
    from batchgen.job.plan import make_plan
    from batchgen.shard.prompts import render_prompts
    from batchgen.shard.rows import row_dicts as _rows

    torch.set_num_threads(2)
    with Timer() as total:
        engine = Engine.load(spec.model, spec.generation, spec.resources.model_copy(
            update={"cpus_per_replica": 2.0}))
        plan = make_plan(spec)
        texts = []
        for f in plan.files:
            table = read_rows(f.url, 0, f.rows, ["topic", "id"], {})
            texts += render_prompts(spec, *_rows(table), engine.tokenizer)[0]
        requests = [Request(tuple(ids), i) for i, ids in enumerate(engine.tokenize(texts))]
        with Timer() as gen:
            done = engine.generate(requests)
    return sum(c.generated_tokens for c in done), gen.seconds, total.seconds


def full_run(spec) -> tuple[int, float, float]:
    from batchgen.job.driver import run_job

    with Timer() as total:
        summary = run_job(spec, live=False, log=lambda _: None)
    markers = [json.loads(p.read_text()) for p in (Path(spec.output.path) / "_batchgen/done").iterdir()]
    # Steady state: tokens of the shards committed after the first one, over the time between
    # the first and the last commit (Ray start, model load and warm-up excluded).
    from datetime import datetime

    markers.sort(key=lambda m: m["committed_at"])
    t = [datetime.fromisoformat(m["committed_at"]).timestamp() for m in markers]
    steady_tokens = sum(m["generated_tokens"] for m in markers[1:])
    return summary.generated_tokens, steady_tokens / max(t[-1] - t[0], 1e-9), total.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    pressure_start = cpu_pressure()
    rows, new_tokens = (128, 16) if args.quick else (2048, 64)
    model = tiny_model()
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        inp = Path(tmp) / "in.parquet"
        make_input(inp, rows)
        log(f"engine direct: {rows} rows x {new_tokens} tokens")
        tok, gen_s, total_s = engine_direct(spec_for(inp, Path(tmp) / "e", model, 1, 2, new_tokens))
        base = tok / gen_s
        emit(bench="system", variant="engine_direct", tokens=tok, tokens_per_s=round(base, 1),
             tokens_per_s_wall=round(tok / total_s, 1), seconds=round(total_s, 1))
        results = {}
        for replicas, cpus in ((1, 2), (2, 1)):
            log(f"batchgen run: {replicas} replica(s) x {cpus} CPU")
            spec = spec_for(inp, Path(tmp) / f"run{replicas}", model, replicas, cpus, new_tokens)
            tok_r, steady_tps, wall_s = full_run(spec)
            assert tok_r == tok, (tok_r, tok)
            results[replicas] = steady_tps
            emit(bench="system", variant=f"batchgen_run_{replicas}x{cpus}cpu", tokens=tok_r,
                 tokens_per_s=round(steady_tps, 1), tokens_per_s_wall=round(tok_r / wall_s, 1),
                 seconds=round(wall_s, 1))
        emit(bench="system_overhead", run_over_engine_steady=round(results[1] / base, 2),
             note="full batchgen run (1 replica x 2 CPU, steady state) / engine alone")
        emit(bench="system_overhead", run_over_engine_steady=round(results[2] / base, 2),
             note="full batchgen run (2 replicas x 1 CPU, steady state) / engine alone")
        emit(bench="replica_scaling", two_over_one=round(results[2] / results[1], 2),
             note="2 replicas x 1 CPU vs 1 replica x 2 CPU, steady state, same machine")
    environment(pressure_start)


if __name__ == "__main__":
    main()
