"""The slot decoder: continuous admission, shared prefills and decode steps over the slot cache.

``SlotDecoder.run(requests)`` returns each request's (token ids, finish reason). It is ``open``,
``add`` and ``advance`` until idle; ``feed`` calls these itself, adding requests (a replica's
next shard) while the loop runs, so the batch never drains between calls. The loop:

1. **Admit** waiting prompts into free slots, prefill-first; the prompts admitted together go
   through the model as one packed sequence (attention per shape). Requests with the same
   prompt (the n samples of a row) share one prefill: the prompt's keys are copied into n slots
   and each sample draws its first token from the shared last logits with its own seed.
2. **Job prefix.** A prompt that starts with the job's prefix is prefilled as prefix + suffix,
   the prefix's keys computed once (``prefill.SlotModel``, the model calls this loop drives).
3. **Decode** one token for every live row. The batch is the live rows, padded up to a
   multiple of ``MIN_ROWS`` (padding rows write to the scratch slot); finished rows free their
   slots at once and waiting prompts take them, so the batch stays full until the queue drains.
4. **Read back one step late**: a step's tokens are read after the next step is launched, so the
   host never waits for the device inside the loop. A row that stopped runs one step more; that
   token is dropped (it never reaches the output).
5. **CUDA graphs** (``graphs``, on CUDA only): a decode step attends over one key length for
   all its rows and is replayed from a graph per (rows bucket, key length bucket).

The device state (slot cache, last tokens, seeds, seen tokens, graphs) is a ``SlotState`` the
engine keeps from run to run.

Invariance: prefill widths are the suffix length rounded up to ``PREFILL_BLOCK``; decode GEMMs
and the LM head see a multiple of ``MIN_ROWS`` rows (so do prefill GEMMs: widths are multiples
of ``PREFILL_BLOCK``); attention depends only on a row's own key length (``attention``); noise
is a pure function of (seed, step, token) (``sampling``). So a row's tokens are bitwise the same
alone, in any batch, forked or not, admitted early or late (on CPU; in bf16 on a GPU, with one
key length per graphed step, the share of matching rows is measured by ``bench_gpu.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from batchgen.engine.attention import Decode, key_length, use_slots
from batchgen.engine.backoff import NonFiniteLogits
from batchgen.engine.graphs import GRAPH_KEY_BLOCK, graph_rows
from batchgen.engine.masks import Matchers, apply_bitmask
from batchgen.engine.prefill import MIN_ROWS, SlotModel, round_up
from batchgen.engine.sampling import (
    Sampler, mark_seen, per_token, seen_from_prompts, token_logprobs
)


@dataclass
class _Row:
    index: int  # into the requests
    slot: int
    length: int  # keys in the slot
    sampled: int = 0  # tokens sampled, read or not
    tokens: list[int] = field(default_factory=list)  # tokens read back
    reason: str | None = None  # set when the row has finished
    logprobs: list = field(default_factory=list)  # per token read: (logprob, top ids, top logprobs)


class SlotDecoder(SlotModel):
    def __init__(self, model: Any, gen: Any, *, eos_ids: set[int], pad_id: int,
                 slots: int, max_batch_tokens: int, hit_stop: Callable[[list[int]], bool],
                 prefix: tuple[int, ...] = (), prefix_kv: dict | None = None,
                 state: dict | None = None, graph_factory: Callable[[], Any] | None = None,
                 matchers: Any = None, logprobs: int | None = None):
        super().__init__(model, gen, pad_id=pad_id, slots=slots,
                         max_batch_tokens=max_batch_tokens, prefix=prefix, prefix_kv=prefix_kv,
                         state=state, graph_factory=graph_factory, graph_step=self._graph_step)
        self.sampler = Sampler(gen)
        self.eos_ids = eos_ids
        self.hit_stop = hit_stop
        # Constrained rows (``masks.Matchers``, those of ``run``'s requests): each step's mask
        # needs the previous step's token, so tokens are read back at once, not one step late.
        self.given_matchers = matchers
        self._clear()
        self.logprobs = logprobs  # top alternatives per token (None: no logprobs)

    @torch.inference_mode()
    def run(self, requests: list[Any]) -> list[tuple[list[int], str, list]]:
        """(token ids, finish reason, per-token logprobs or []) per request."""
        if not requests:
            return []
        self.open()
        self.add(requests, self.given_matchers)
        out: list[tuple[list[int], str, list]] = [([], "length", [])] * len(requests)
        while self.busy:
            for index, result in self.advance():
                out[index] = result
        return out

    # -- the loop, one turn at a time (``run``, and ``feed`` across calls) ----------------

    def open(self) -> None:
        """Start with no requests; ``add`` appends them, ``advance`` runs the loop."""
        use_slots(self.model)
        self._clear()

    def _clear(self) -> None:
        self.requests: list[Any] = []
        self.queue: deque[tuple[tuple[int, ...], list[int]]] = deque()
        self.live: list[_Row] = []
        self.pending: list[tuple[list[_Row], dict, Any]] = []
        self.matchers = None

    @property
    def busy(self) -> bool:
        """Requests wait, rows decode, or a step's tokens are still to be read."""
        return bool(self.queue or self.live or self.pending)

    def _needs(self, prompts) -> list[int]:
        # Every prefill (the prefix's in the scratch slot too) and every decode key length
        # (``key_length``, one past the last token) fits.
        max_new = self.gen.max_new_tokens
        return [max(sum(self.shape(p)), len(p) + max_new + 1) for p in prompts]

    def fits(self, requests: list[Any]) -> bool:
        """Whether ``add(requests)`` may be called now: always when idle (it holds a cache for
        them); while rows are live, only within the cache they hold (its capacity is fixed
        under them)."""
        if not self.busy or not requests:
            return True
        return max(self._needs({tuple(r.prompt_ids) for r in requests})) <= self.cache.capacity

    def add(self, requests: list[Any], matchers: Any = None) -> int:
        """Append ``requests`` while the loop runs; their indices continue from the previous
        ones (the first one's is returned). ``matchers``: theirs (``masks.Matchers``, indexed
        from 0), or None. Raises ValueError when they do not ``fit``."""
        offset = len(self.requests)
        if not requests:
            return offset
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(r.prompt_ids), []).append(offset + i)
        if not self.busy:
            self.hold(self._needs(groups))
        elif not self.fits(requests):
            raise ValueError(f"{len(requests)} requests need a larger slot cache than the "
                             f"{self.cache.capacity} positions the live rows hold; add them "
                             "when the decoder is idle")
        self.requests.extend(requests)
        # Constrained rows anywhere: masks for every row, by request index (None elsewhere).
        if matchers is not None and matchers.active:
            if self.matchers is None:
                self.matchers = Matchers(None, [None] * offset)
            self.matchers.extend(matchers)
        elif self.matchers is not None:
            self.matchers.extend(Matchers(None, [None] * len(requests)))
        # Requests with one prompt fork from one prefill, at most a cache's worth at a time: a
        # prompt shared by many rows (or n samples beyond the batch size) is prefilled once per
        # chunk, so the slots never outgrow the batch size (a chunk's rows are the same bits).
        per = self.cache.slots
        self.queue.extend((p, g[i:i + per]) for p, g in groups.items()
                          for i in range(0, len(g), per))
        return offset

    @torch.inference_mode()
    def advance(self) -> list[tuple[int, tuple[list[int], str, list]]]:
        """One turn of the loop: admit waiting prompts, launch a decode step, read the previous
        one back, release the rows that finished. Returns theirs: (request index, (token ids,
        finish reason, per-token logprobs or []))."""
        max_new = self.gen.max_new_tokens
        pending = self.pending
        pending.extend(self._admit())
        if self.matchers is not None:  # constrained: the next masks need these tokens now
            pending = self._read_all(pending)
        if self.queue and not self.live:  # nothing runs, nothing admitted: never wait forever
            raise RuntimeError(f"{len(self.queue[0][1])} samples of one prompt need more "
                               f"than the {self.cache.free} free slots")
        stepping = [r for r in self.live if r.reason is None and r.sampled < max_new]
        launched = self._decode(stepping) if stepping else None
        pending = self._read_all(pending)
        pending = [launched] if launched else []
        if self.matchers is not None:
            pending = self._read_all(pending)
        self.pending = pending
        # A finished row leaves now, even if the step in flight still computes it: what that
        # step writes into its slot comes before the next prompt's prefill there (one
        # stream), and its token is dropped on reading (``_read``).
        done = [r for r in self.live if r.reason is not None]
        for r in done:
            self.live.remove(r)
            self.cache.release(r.slot)
        return [(r.index, (r.tokens, r.reason, r.logprobs)) for r in done]

    def _read_all(self, pending: list) -> list:
        for rows, host, ready in pending:
            if ready is not None:
                ready.synchronize()
            self._read(rows, host)
        return []

    def _read(self, rows: list[_Row], host: dict[str, torch.Tensor]) -> None:
        tokens, bad = host["packed"].tolist()
        if any(bad):
            raise NonFiniteLogits("the model produced NaN/inf logits")
        lps = None
        if "logprob" in host:
            lps = per_token(host["logprob"], host.get("top_ids"), host.get("top_logprobs"))
        for j, (r, tok) in enumerate(zip(rows, tokens)):
            if r.reason is not None:
                continue  # a step past the row's end
            r.tokens.append(tok)
            if lps is not None:
                r.logprobs.append(lps[j])
            if self.matchers is not None:
                self.matchers.advance(r.index, tok)
            if tok in self.eos_ids or self.hit_stop(r.tokens):
                r.reason = "stop"
            elif len(r.tokens) == self.gen.max_new_tokens:
                r.reason = "length"

    # -- admission and prefill -----------------------------------------------------------

    def _admit(self) -> list[tuple[list[_Row], torch.Tensor, Any]]:
        admitted: list[tuple[tuple[int, ...], list[_Row]]] = []
        while self.queue and len(self.queue[0][1]) <= self.cache.free:
            prompt, indices = self.queue.popleft()
            rows = [_Row(i, self.cache.take(), len(prompt)) for i in indices]
            admitted.append((prompt, rows))
        if not admitted:
            return []
        # One packed prefill per chunk of the token budget, prompts sorted by (split, width):
        # each shape's rows are contiguous, one attention call per shape.
        shaped = sorted((self.shape(p), p, rows) for p, rows in admitted)
        results, chunk, tokens = [], [], 0
        for shape, prompt, rows in shaped:
            if chunk and tokens + shape[1] > self.max_batch_tokens:
                results.append(self._prefill(chunk))
                chunk, tokens = [], 0
            chunk.append((shape, prompt, rows))
            tokens += shape[1]
        results.append(self._prefill(chunk))
        self.live.extend(r for _, rows in admitted for r in rows)
        return results

    def _prefill(self, items):
        """Prefill ``items`` ((offset, width), prompt, rows) in one forward, packed."""
        dev = self.device
        hidden, starts = self.forward([(shape, prompt, rows[0].slot)
                                        for shape, prompt, rows in items])
        last = [at + len(prompt) - offset - 1
                for at, ((offset, _), prompt, _) in zip(starts, items)]
        logits = self.logits(hidden[torch.tensor(last, device=dev)])
        # Fork: the prompt's keys into its other samples' slots; every sample draws its first
        # token from the shared logits with its own seed.
        children, which = [], []
        for i, (_, prompt, rows) in enumerate(items):
            self.cache.copy(rows[0].slot, [r.slot for r in rows[1:]], len(prompt))
            children.extend(rows)
            which.extend([i] * len(rows))
        slots = torch.tensor([r.slot for r in children], device=dev)
        self.seeds[slots] = torch.tensor([self.requests[r.index].seed for r in children],
                                         dtype=torch.long, device=dev)
        if self.seen is not None:
            self.seen[slots] = seen_from_prompts(
                logits.shape[-1], [items[i][1] for i in which], dev)
        return self._sample(children, slots, logits[torch.tensor(which, device=dev)])

    # -- decode --------------------------------------------------------------------------

    def _decode(self, rows: list[_Row]):
        dev = self.device
        n = len(rows)
        graphs = self.state.graphs
        graphed = graphs is not None and graphs.enabled
        b = graph_rows(n) if graphed else round_up(n, MIN_ROWS)
        slots = [r.slot for r in rows] + [self.cache.scratch] * (b - n)
        positions = [r.length for r in rows] + [0] * (b - n)
        slots_t = torch.tensor(slots, device=dev)
        inputs = {"ids": self.last_token[slots_t],
                  "positions": torch.tensor(positions, device=dev),
                  "slots": slots_t,
                  "seeds": self.seeds[slots_t],
                  "steps": torch.tensor([r.sampled for r in rows] + [0] * (b - n), device=dev)}
        allowed = self._allowed(rows, b)
        if allowed is not None:
            inputs["allowed"] = allowed
        if graphed:
            # One key length for the whole step (a graph per (rows, key length) bucket).
            longest = max(key_length(p) for p in positions)
            length = min(round_up(longest, GRAPH_KEY_BLOCK), self.cache.capacity)
            out = graphs((b, length, allowed is not None), inputs)
        else:
            # One SDPA call per key-length bucket: a row attends over the same key length
            # whatever its neighbours (bitwise invariance on CPU).
            buckets: dict[int, list[int]] = {}
            for i, p in enumerate(positions):
                buckets.setdefault(key_length(p), []).append(i)
            groups = [(torch.tensor(idx, device=dev), length)
                      for length, idx in sorted(buckets.items())]
            out = self._step(groups, inputs)
        for r in rows:
            r.length += 1
            r.sampled += 1
        s = self.stats
        s.steps += 1
        s.row_steps += n
        s.slot_steps += self.cache.slots
        if self.queue:
            s.busy_row_steps += n
            s.busy_slot_steps += self.cache.slots
        return self._readback(rows, out)

    def _graph_step(self, key: tuple[int, int, bool], inputs: dict[str, torch.Tensor]):
        rows, length, _ = key
        return self._step([(torch.arange(rows, device=self.device), length)], inputs)

    def _step(self, groups, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decode step on device tensors only (no host sync: CUDA graphs capture it):
        the model, the LM head, sampling, each slot's last token and seen tokens."""
        slots, positions = inputs["slots"], inputs["positions"]
        step = Decode(self.cache, slots, positions, groups)
        hidden = self.hidden(inputs["ids"][:, None], positions[:, None], step)
        logits = self.head(hidden[:, -1]).float()
        return self._choose(logits, slots, inputs["seeds"], inputs["steps"],
                            inputs.get("allowed"))

    def _sample(self, rows: list[_Row], slots: torch.Tensor, logits: torch.Tensor):
        """First tokens, from the prefill's logits."""
        steps = torch.tensor([r.sampled for r in rows], dtype=torch.long, device=self.device)
        out = self._choose(logits, slots, self.seeds[slots], steps, self._allowed(rows, len(rows)))
        for r in rows:
            r.sampled += 1
        return self._readback(rows, out)

    def _allowed(self, rows: list[_Row], width: int) -> torch.Tensor | None:
        """The constrained rows' token bitmasks (padding rows allow everything), or None."""
        if self.matchers is None:
            return None
        return self.matchers.bitmask([r.index for r in rows] + [None] * (width - len(rows)),
                                     self.device)

    def _choose(self, logits, slots, seeds, steps, allowed=None) -> dict[str, torch.Tensor]:
        """Each row's token, kept as its slot's last token (and seen). Returns "packed" [2,
        rows]: the tokens and whether the row's logits were NaN/+inf; with logprobs also
        "logprob" [rows] (and "top_ids", "top_logprobs" [rows, K]), from the model's logits.
        ``allowed``: the constrained rows' token bitmasks, applied before sampling. Device ops
        only."""
        raw = logits
        if allowed is not None:
            logits = apply_bitmask(logits, allowed)
        seen = None if self.seen is None else self.seen[slots]
        tokens = self.sampler.choose(logits, seeds, steps, seen)
        self.last_token[slots] = tokens
        if self.seen is not None:
            mark_seen(self.seen, slots, tokens)
        bad = (raw.isnan() | raw.isposinf()).any(-1)
        out = {"packed": torch.stack([tokens, bad.long()])}
        if self.logprobs is not None:
            chosen, top_ids, top_lps = token_logprobs(raw, tokens, self.logprobs)
            out["logprob"] = chosen
            if top_ids is not None:
                out["top_ids"], out["top_logprobs"] = top_ids, top_lps
        return out

    def _readback(self, rows: list[_Row], out: dict[str, torch.Tensor]):
        """(rows, the step's outputs on the host, an event to wait on): copied without
        waiting; ``run`` reads them one step later (at once when constrained)."""
        n = len(rows)
        out = {k: (v[:, :n] if k == "packed" else v[:n]) for k, v in out.items()}
        if next(iter(out.values())).device.type != "cuda":
            return rows, out, None
        ready = torch.cuda.Event()
        out = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
        ready.record()
        return rows, out, ready
