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
