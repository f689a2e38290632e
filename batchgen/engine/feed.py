"""One decode loop for callers in several threads: a replica keeps its slots full across shards.

``EngineFeed(engine).generate(requests)`` returns what ``engine.generate(requests)`` returns (the
same completions, bitwise: a row's output depends only on its prompt and seed). The difference
is throughput: one ``generate`` call drains at its end, its last rows decoding in an ever
smaller batch. Here one background thread owns one ``SlotDecoder`` while there is work, and
each submission's requests join the running loop (``SlotDecoder.add``): the next shard's rows
take the slots the current one's free. A submission is returned when all its rows are done,
finished as ``Engine._run`` finishes them (text, stop strings, logprobs, constraints, stats).

- **Capacity.** The slot cache cannot grow under live rows: a submission needing more waits
  until the loop is idle, then a fresh decoder holds a larger cache. Submissions join in order.
- **Failures.** If the loop raises (out of memory, NaN logits), every submission that was in
  it is re-run in this thread through ``engine.generate``, back-off and all, so a failure
  behaves exactly as it does without the feed (its error, if any, goes to its caller alone).
- **Thread.** Started by the first submission, gone once nothing is queued or decoding (a
  dropped engine does not keep a thread alive). While a feed runs, the engine's slot state is
  its own: call the engine's ``generate`` and ``score`` only when no submission is in flight.

The slot path only: the Hugging Face path and the echo engine have no feed (``Engine.feed``).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections import deque
from dataclasses import fields
from typing import Any, Callable

import torch

from batchgen.engine.completions import Completion, Request
from batchgen.engine.prefill import ENGINE_COUNTERS, DecodeStats

_made = threading.Lock()


class Submission:
    """One caller's requests in the feed; ``result()`` waits for their completions."""

    def __init__(self, requests: list[Request], matchers: Any):
        self.requests = requests
        self.matchers = matchers  # masks.Matchers of these requests (from 0), or None
        self.offset = 0  # the first request's index in the decoder
        self.results: list[Any] = [None] * len(requests)
        self.left = len(requests)
        self._done = threading.Event()
        self._completions: list[Completion] | None = None
        self._error: BaseException | None = None

    def settle(self, completions: list[Completion] | None = None,
               error: BaseException | None = None) -> None:
        self._completions, self._error = completions, error
        self._done.set()

    def result(self) -> list[Completion]:
        release_openmp_pool()  # this thread waits; the feed's decodes
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._completions  # type: ignore[return-value]


class EngineFeed:
    """``constrained(completion, matchers, i)``: the engine's last word on a constrained row
    (``engine._under_constraint``; passed in, as the engine module imports this one)."""

    def __init__(self, engine: Any, constrained: Callable[[Completion, Any, int], Completion]):
        self.engine = engine
        self.constrained = constrained
        self._lock = threading.Lock()
        self._incoming: deque[Submission] = deque()
        self._thread: threading.Thread | None = None  # running while there is work
        self._decoder: Any = None
        self._running: list[Submission] = []  # added to the decoder, not done

    @classmethod
    def of(cls, engine: Any, constrained: Callable) -> EngineFeed:
        """The engine's one feed (made once, whatever the threads asking)."""
        with _made:
            feed = engine.__dict__.get("_feed")
            if feed is None:
                feed = engine._feed = cls(engine, constrained)
                release_openmp_pool()  # the thread that loaded the model hands decoding over
            return feed

    def submit(self, requests: list[Request]) -> Submission:
        """Queue ``requests``; returns at once. Their constraints' matchers are made here, in
        the caller's thread (they read the tokenizer)."""
        requests = list(requests)
        sub = Submission(requests, self.engine._matchers(requests) if requests else None)
        if not requests:
            sub.settle([])
            return sub
        with self._lock:
            self._incoming.append(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="batchgen-feed",
                                                daemon=True)
                self._thread.start()
        return sub

    def generate(self, requests: list[Request]) -> list[Completion]:
        return self.submit(requests).result()

    # -- the thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            with torch.inference_mode():  # a thread's own mode
                while self._turn():
                    pass
        except BaseException as e:  # the thread is going: nobody may wait forever
            with self._lock:
                waiting = [*self._running, *self._incoming]
                self._running, self._thread, self._decoder = [], None, None
                self._incoming.clear()
            for sub in waiting:
                sub.settle(error=e)
            raise

    def _turn(self) -> bool:
        """Add what fits, run one turn of the loop, hand back what is done; False (and the
        thread ends) when there is nothing left."""
        with self._lock:
            if not self._incoming and not self._running:
                self._thread = None
                return False
        try:
            self._add()
            if self._decoder is not None:
                self._advance()
        except Exception:  # noqa: BLE001 - each submission re-runs alone, as without a feed
            self._fold()
            self._decoder, failed, self._running = None, self._running, []
            self._classic(failed)
        return True

    def _add(self) -> None:
        while True:
            with self._lock:
                sub = self._incoming[0] if self._incoming else None
            if sub is None or not (self._decoder is None or self._decoder.fits(sub.requests)):
                return
            with self._lock:
                self._incoming.popleft()
            self._running.append(sub)  # first: a failure from here on re-runs it classically
            if self._decoder is None:
                self._open()
            sub.offset = self._decoder.add(sub.requests, sub.matchers)

    def _open(self) -> None:
        """A fresh decoder over the engine's kept state, as ``Engine._run`` makes one."""
        e = self.engine
        self._folded, self._since = DecodeStats(), time.perf_counter()
        decoder = e._slot_decoder(e.gen, e.eos_ids, e._prefix, e._prefix_kv, e._state)
        decoder.open()
        self._decoder = decoder

    def _advance(self) -> None:
        finished = self._decoder.advance()
        complete = []
        for index, result in finished:
            sub = next(s for s in self._running
                       if s.offset <= index < s.offset + len(s.requests))
            sub.results[index - sub.offset] = result
            sub.left -= 1
            if sub.left == 0:
                complete.append(sub)
        if not self._decoder.busy:
            self._fold()
            self._decoder = None
        elif complete:
            self._fold()
        for sub in complete:
            self._running.remove(sub)
            try:
                sub.settle(self._finish(sub))
            except Exception as e:  # noqa: BLE001 - finishing failed: that caller's error
                sub.settle(error=e)

    def _finish(self, sub: Submission) -> list[Completion]:
        """Completions as ``Engine._run`` makes them, and its counters."""
        e, s = self.engine, self.engine.stats
        completions = [e._finish(ids, reason, lps) for ids, reason, lps in sub.results]
        if sub.matchers is not None:
            completions = [self.constrained(c, sub.matchers, i)
                           for i, c in enumerate(completions)]
        s.batches += 1
        s.prompt_tokens += sum(len(r.prompt_ids) for r in sub.requests)
        s.generated_tokens += sum(c.generated_tokens for c in completions)
        return completions

    def _fold(self) -> None:
        """The decoder's counters since the last fold, and the loop's time, into the engine's
        (``EngineStats.seconds``: the loop's wall time, overlapping submissions counted once)."""
        if self._decoder is None:
            return
        s, d, was = self.engine.stats, self._decoder.stats, self._folded
        for mine, theirs in ENGINE_COUNTERS.items():
            setattr(s, mine, getattr(s, mine) + getattr(d, theirs) - getattr(was, theirs))
        self._folded = DecodeStats(**{f.name: getattr(d, f.name) for f in fields(d)})
        now = time.perf_counter()
        s.seconds += now - self._since
        self._since = now

    def _classic(self, failed: list[Submission]) -> None:
        """The loop raised: each submission that was in it runs again alone through the
        engine's own ``generate`` (back-off, float32 retry, error completions), in this
        thread."""
        for sub in failed:
            try:
                sub.settle(self.engine.generate(sub.requests))
            except BaseException as e:  # noqa: BLE001 - that caller's error, as without a feed
                sub.settle(error=e)


def release_openmp_pool() -> None:
    """Free the calling thread's OpenMP worker pool (GNU libgomp, as PyTorch's wheels ship);
    nothing elsewhere. libgomp keeps a pool per thread that ever ran a parallel region, and once
    the pools hold more threads than the process has CPUs it stops spinning between regions, so
    each of a decode step's hundreds of small parallel ops wakes its workers from sleep.
    Measured (2 CPUs, 2 torch threads, the tiny model): the feed's thread decoded 2.6x slower
    while the thread that had loaded the model kept its pool; as fast as before once freed."""
    pause = _omp_pause()
    if pause is not None:
        pause(1)  # omp_pause_soft; libgomp frees the calling thread's pool only


@functools.cache
def _omp_pause():
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({p[-1] for line in f if len(p := line.split()) >= 6
                            and p[-1].rsplit("/", 1)[-1].startswith("libgomp")})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
    return None
