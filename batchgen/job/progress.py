"""Job counters, the status document, and how progress is shown.

``JobProgress`` is plain bookkeeping: the driver tells it what happened and it produces the
``status.json`` document (state, request counts, tokens, rates, ETA) and a one-line summary. On a
terminal a rich progress bar shows it live; otherwise a log line is printed every ``log_every``
seconds, which is what a Ray job's log or CI wants.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

STATES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelled")


def now_iso(timespec: str = "seconds") -> str:
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


class JobProgress:
    def __init__(self, *, name: str | None, output: str, total_shards: int, total_rows: int, n: int):
        self.name = name
        self.output = output
        self.state = "validating"
        self.total_shards = total_shards
        self.total_rows = total_rows
        self.n = n
        self.done_shards = 0
        self.failed_shards: list[str] = []
        self.running = 0
        self.rows_done = 0
        self.outputs_done = 0
        self.error_rows = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.scored_tokens = 0  # mode: score
        self.created_at = now_iso()
        self.finished_at: str | None = None
        self.error: str | None = None
        self._t0 = time.monotonic()
        self._rows_at_start = 0
        self._gen_at_start = 0

    def resume_from(self, markers: list[dict[str, Any]]) -> None:
        """Count shards committed by an earlier run; rates count only this run's work."""
        for m in markers:
            self._add(m)
        self._rows_at_start = self.rows_done
        self._gen_at_start = self.generated_tokens + self.scored_tokens

    def committed(self, marker: dict[str, Any], replaces: dict[str, Any] | None = None) -> None:
        """A shard committed; ``replaces`` is its earlier marker when only its error rows ran
        again (``--retry-failed``)."""
        if replaces is not None:
            self._add(replaces, sign=-1)
        self._add(marker)

    def _add(self, m: dict[str, Any], sign: int = 1) -> None:
        self.done_shards += sign
        self.rows_done += sign * m["rows"]
        self.outputs_done += sign * m["outputs"]
        self.error_rows += sign * m["errors"]
        self.prompt_tokens += sign * m["prompt_tokens"]
        self.generated_tokens += sign * m["generated_tokens"]
        self.scored_tokens += sign * m.get("scored_tokens", 0)

    def start(self) -> None:
        self.state = "in_progress"
        self._t0 = time.monotonic()

    def finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error, self.finished_at = state, error, now_iso()
        self.running = 0  # whatever was in flight is committed or abandoned now

    # -- figures ---------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self._t0, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        """Tokens generated (or, in a score job, scored) per second by this run."""
        return (self.generated_tokens + self.scored_tokens - self._gen_at_start) / self.elapsed

    @property
    def rows_per_second(self) -> float:
        return (self.rows_done - self._rows_at_start) / self.elapsed

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        return None if rate <= 0 else (self.total_rows - self.rows_done) / rate

    def status(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {
            "state": self.state,
            "name": self.name,
            "output": self.output,
            "shards": {
                "total": self.total_shards,
                "completed": self.done_shards,
                "failed": len(self.failed_shards),
                "running": self.running,
            },
            "request_counts": {
                "total": self.total_rows * self.n,
                "completed": self.outputs_done - self.error_rows,
                "failed": self.error_rows,
            },
            "rows": {"total": self.total_rows, "done": self.rows_done},
            "tokens": {"prompt": self.prompt_tokens, "generated": self.generated_tokens,
                       "scored": self.scored_tokens},
            "tokens_per_second": round(self.tokens_per_second, 2),
            "rows_per_second": round(self.rows_per_second, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "failed_shards": self.failed_shards,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": now_iso(),
            "finished_at": self.finished_at,
        }

    def line(self) -> str:
        eta = self.eta_seconds
        return (
            f"[{self.state}] shards {self.done_shards}/{self.total_shards}"
            f"{f' ({len(self.failed_shards)} failed)' if self.failed_shards else ''}"
            f", rows {self.rows_done}/{self.total_rows}, errors {self.error_rows}"
            f", {self.tokens_per_second:.1f} tok/s"
            f", ETA {'-' if eta is None else f'{eta:.0f}s'}"
        )


class Display:
    """A live bar on a terminal, periodic log lines elsewhere."""

    def __init__(self, progress: JobProgress, *, live: bool | None = None, log: Callable[[str], None] | None = None, log_every: float = 10.0):
        self.p = progress
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.live = sys.stderr.isatty() if live is None else live
        self.log_every = log_every
        self._last_log = 0.0
        self._bar = None

    def __enter__(self) -> Display:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} rows"),
                TextColumn("{task.fields[shards]} shards"),
                TextColumn("{task.fields[tps]:.1f} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("generating", total=self.p.total_rows, shards="", tps=0.0)
        return self

    def update(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.p.rows_done,
                shards=f"{self.p.done_shards}/{self.p.total_shards}",
                tps=self.p.tokens_per_second,
            )
        elif force or time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            self.log(self.p.line())

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self.update()
            self._bar.stop()
