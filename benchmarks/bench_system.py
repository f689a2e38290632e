"""System overhead and replica scaling, side by side in one run.

The same rows, prompts and generation settings (greedy, ignore_eos, a fixed number of new tokens):
  engine       the batchgen engine called directly in this process (2 torch threads),
  run/1x2      the full `batchgen run` path: Ray, Parquet in, storage out, commits; 1 replica x 2 CPU,
  run/2x1      the same with 2 replicas x 1 CPU.
Tokens/s are reported two ways: over the whole wall time (Ray start and model loads included),
and over the time from the first to the last committed shard (steady state, from the done
markers' millisecond commit times). Rounds of (engine alone, run 1x2, run 2x1) and the engine
alone once more: each round's ratios are over the mean of the engine runs either side of it,
and the reported ratio is the median of the rounds (``--rounds``, 3). Every setting is the run's: batch_size 32 (the engine
never holds more slots than that, even for requests that share a prompt), 2 torch threads.
``shard_time_in_engine``: the share of the replica's shard time spent in the engine.

    python benchmarks/bench_system.py [--quick] [--rounds N]
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
    # Where a shard's time in the replica goes: waiting on the engine, or the rest (read,
    # render, tokenize, assemble, write).
    shard_s = sum(m["seconds"] for m in markers)
    engine_s = sum(m.get("engine_seconds", 0.0) for m in markers)
    return (summary.generated_tokens, steady_tokens / max(t[-1] - t[0], 1e-9), total.seconds,
            engine_s / max(shard_s, 1e-9))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (engine alone, run 1x2, run 2x1); ratios are their medians")
    args = ap.parse_args()
    pressure_start = cpu_pressure()
    rows, new_tokens = (128, 16) if args.quick else (2048, 64)
    rounds = 1 if args.quick else args.rounds
    model = tiny_model()
    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
        inp = Path(tmp) / "in.parquet"
        make_input(inp, rows)

        def direct(label: str) -> tuple[int, float]:
            log(f"engine direct ({label}): {rows} rows x {new_tokens} tokens")
            tok, gen_s, total_s = engine_direct(spec_for(inp, Path(tmp) / f"e-{label}", model, 1,
                                                         2, new_tokens))
            emit(bench="system", variant="engine_direct", at=label, tokens=tok,
                 tokens_per_s=round(tok / gen_s, 1), tokens_per_s_wall=round(tok / total_s, 1),
                 seconds=round(total_s, 1))
            return tok, tok / gen_s

        # Rounds of (engine alone, run 1x2, run 2x1), the engine alone once more at the end: each
        # round's baseline is the mean of the engine runs either side of it (on a shared box the
        # load drifts), and each ratio is the median over the rounds.
        tok, base = direct("round 1")
        ratios: dict[str, list[float]] = {"1x2": [], "2x1": []}
        for r in range(rounds):
            steady = {}
            for replicas, cpus in ((1, 2), (2, 1)):
                log(f"round {r + 1}: batchgen run, {replicas} replica(s) x {cpus} CPU")
                spec = spec_for(inp, Path(tmp) / f"run{r}-{replicas}", model, replicas, cpus,
                                new_tokens)
                tok_r, steady_tps, wall_s, in_engine = full_run(spec)
                assert tok_r == tok, (tok_r, tok)
                steady[f"{replicas}x{cpus}"] = steady_tps
                emit(bench="system", variant=f"batchgen_run_{replicas}x{cpus}cpu",
                     at=f"round {r + 1}", tokens=tok_r, tokens_per_s=round(steady_tps, 1),
                     tokens_per_s_wall=round(tok_r / wall_s, 1), seconds=round(wall_s, 1),
                     shard_time_in_engine=round(in_engine, 3))
            _, after = direct(f"round {r + 2}" if r + 1 < rounds else "end")
            for key, tps in steady.items():
                ratios[key].append(tps / ((base + after) / 2))
            base = after

        def median(xs: list[float]) -> float:
            return sorted(xs)[len(xs) // 2]

        for key, what in (("1x2", "1 replica x 2 CPU"), ("2x1", "2 replicas x 1 CPU")):
            emit(bench="system_overhead", run_over_engine_steady=round(median(ratios[key]), 2),
                 rounds=[round(x, 2) for x in ratios[key]],
                 note=f"full batchgen run ({what}, steady state) / engine alone, median of rounds")
        emit(bench="replica_scaling",
             two_over_one=round(median([b / a for a, b in zip(ratios["1x2"], ratios["2x1"])]), 2),
             note="2 replicas x 1 CPU vs 1 replica x 2 CPU, steady state, same machine")
    environment(pressure_start)


if __name__ == "__main__":
    main()
