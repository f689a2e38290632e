"""Shared by the benchmarks: JSON-line output, the models, the prompt mix."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / ".demo" / "tiny-model"


def emit(**record) -> None:
    """One figure per line, JSON, to stdout (what `make bench` prints)."""
    record.setdefault("machine", f"{os.cpu_count()} cpu, {platform.machine()}")
    print(json.dumps(record, sort_keys=False), flush=True)


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def tiny_model() -> Path:
    if not (TINY / "config.json").exists():
        from batchgen.tinymodel import build_tiny_model

        build_tiny_model(TINY)
    return TINY


def prompt_lengths(n: int, seed: int = 0, lo: int = 16, hi: int = 512, median: float = 96) -> list[int]:
    """A realistic, seeded log-normal mix of prompt lengths, clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [min(hi, max(lo, int(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(n)]


def random_prompts(lengths: list[int], vocab: int, seed: int = 0, skip: int = 16) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(skip, vocab) for _ in range(n)] for n in lengths]


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def shared_prefix_prompts(rows: int, vocab: int, seed: int = 0, prefix_len: int = 190,
                          lo: int = 25, hi: int = 50, skip: int = 16
                          ) -> tuple[list[int], list[list[int]]]:
    """A synthetic-data job in token ids: one shared prefix of ``prefix_len`` ids (the system
    prompt and few-shot examples every rendering starts with), then a unique part of ``lo``..``hi``
    ids per row (random lengths). Seeded. Returns (the shared ids, the full prompts)."""
    rng = random.Random(seed)
    shared = [rng.randrange(skip, vocab) for _ in range(prefix_len)]
    prompts = [shared + [rng.randrange(skip, vocab) for _ in range(rng.randint(lo, hi))]
               for _ in range(rows)]
    return shared, prompts


def common_token_prefix(prompts: list[list[int]]) -> tuple[int, ...]:
    """The longest common token prefix of the rendered prompts, minus its last token (a shared
    text's last token can merge with what follows it when a row is tokenized whole)."""
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = min(n, len(p))
        for i in range(n):
            if p[i] != first[i]:
                n = i
                break
    return tuple(first[:max(0, n - 1)])


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 5 minutes (%) in which some runnable task waited for a
    CPU; high when other work shares the cores. None where /proc/pressure is absent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return float(fields["avg300"]) if "avg300" in fields else None


def environment(pressure_start: float | None, **extra) -> None:
    """The machine's load while a benchmark ran, as its last line: what else shared the cores
    (every ratio is measured side by side to cancel it out, but a figure is read with it)."""
    import torch

    emit(bench="environment", torch_threads=torch.get_num_threads(),
         cpu_pressure_start=pressure_start, cpu_pressure=cpu_pressure(),
         load_average=[round(x, 2) for x in os.getloadavg()], **extra,
         note="cpu_pressure: /proc/pressure/cpu 'some' avg300 (%) at the start and the end: the "
              "share of time runnable work waited for a CPU; load_average: 1/5/15 min at the end")
