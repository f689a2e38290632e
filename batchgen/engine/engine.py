"""Batched decoding with a Hugging Face causal LM. No Ray, no storage: text in, text out.

Contract: ``Engine.generate(requests)`` returns one ``Completion`` per ``Request`` in the same
order. A request's output depends only on its prompt tokens and its seed, never on which other
requests share its batch, shard, replica or attempt (bitwise on a CPU; the families that cannot
keep it on this machine are named by ``Engine.invariant`` / ``invariant_reason``, and the done
markers carry it).

Two paths decode (chosen once per model by the load-time ``probe``):

- the **slot path** (``decoder``, ``attention``, ``slots``): a slot KV cache behind an attention
  function registered with transformers, continuous admission, the n samples of a row forked
  from one prefill, and the job's shared prefix prefilled once per replica;
- the **Hugging Face path** (``hfdecode``): transformers' own cache and attention, batches cut
  within one padded prompt width (a function of the prompt alone), for models the slot path
  cannot serve.

Both sample with ``sampling.Sampler``: noise is a pure function of (seed, step, token).
Scoring (``scoring``) prefills prompt + completion on either path. ``versions.ENGINE_VERSION``
names the streams this engine produces; it is part of every job's fingerprint and done markers,
so a resume never mixes the outputs of two versions.

Back-off (``backoff``): a batch that runs out of memory, or whose logits turn NaN/+inf, is split
in halves; a single request that still fails is retried once with the weights in float32
(non-finite logits only), else returned as an error completion.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from batchgen.engine import probe
from batchgen.engine.backoff import NonFiniteLogits, failure, free_memory, in_float32, run_or_split
from batchgen.engine.completions import (
    Completion, EngineStats, Request, Score, ScoreRequest, TokenLogprob, fit_prompt
)
from batchgen.engine.decoder import SlotDecoder
from batchgen.engine.echo import EchoEngine
from batchgen.engine.experts import use_invariant_experts
from batchgen.engine.hfdecode import HFDecoder, invariance, prompt_width
from batchgen.engine.loading import load_model
from batchgen.engine.prefill import ENGINE_COUNTERS
from batchgen.engine.rotary import by_length, use_row_rotary
from batchgen.engine.scoring import score_hf, score_slots
from batchgen.io.modelcheck import context_length, input_budget
from batchgen.spec import GenerationSpec, ModelSpec, ResourcesSpec

log = logging.getLogger("batchgen.engine")


def load_engine(model: ModelSpec, generation: GenerationSpec, resources: ResourcesSpec):
    if model.engine == "echo":
        return EchoEngine(generation, model.max_input_tokens, model.truncation)
    return Engine.load(model, generation, resources)


class Engine:
    """``path``: "auto" (the probe decides), "slots" or "hf". ``prefix``: the job's shared
    prompt prefix in tokens (``set_prefix``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        generation: GenerationSpec,
        *,
        max_input_tokens: int | None,
        truncation: str = "left",
        batch_size: int = 32,
        max_batch_tokens: int = 32768,
        path: str = "auto",
        prefix: tuple[int, ...] = (),
        cuda_graphs: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.gen = generation
        self.max_input_tokens = max_input_tokens
        self.truncation = truncation
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.stats = EngineStats()
        self._prefix: tuple[int, ...] = ()
        self._prefix_kv: dict = {}  # the prefix's keys per dtype, computed once per replica
        self._state: dict = {}  # the slot decoder's device state (cache, graphs) across runs
        self._grammars = None  # structured.Grammars, made with the first constrained request
        self._token_text: dict[int, str] = {}
        self.graph_factory = None
        if cuda_graphs and self.device.type == "cuda":
            from batchgen.engine.graphs import CudaGraph

            self.graph_factory = CudaGraph
        use_invariant_experts(model)  # MoE: each expert's rows padded (both paths)
        use_row_rotary(model)  # longrope, dynamic NTK: each row's own frequencies (slot path)
        self.path, self.path_reason = self._choose_path(path)
        # Whether a row's output depends on its prompt and seed alone, bitwise on this CPU (the
        # done markers say so where it does not).
        self.invariant, self.invariant_reason = invariance(model, self.path)
        self.set_prefix(prefix)

    @property
    def gen(self) -> GenerationSpec:
        return self._gen

    @gen.setter
    def gen(self, generation: GenerationSpec) -> None:
        self._gen = generation
        self.eos_ids = set() if generation.ignore_eos else _eos_ids(self.model, self.tokenizer)
        # A reasoning model's end-of-thinking marker: constraints start after it (``masks``).
        self._gate = generation.reasoning_end
        longest_stop = max((len(s) for s in generation.stop), default=0)
        self._stop_window = 2 * longest_stop + 4  # tokens re-decoded to look for a stop string

    @classmethod
    def load(
        cls, model: ModelSpec, generation: GenerationSpec, resources: ResourcesSpec
    ) -> Engine:
        lm, tokenizer = load_model(model, resources)
        budget = input_budget(model, generation,
                              context_length(lm.config, tokenizer.model_max_length))
        return cls(
            lm,
            tokenizer,
            generation,
            max_input_tokens=budget,
            truncation=model.truncation,
            batch_size=resources.batch_size,
            max_batch_tokens=resources.max_batch_tokens,
        )

    # -- the path --------------------------------------------------------------------------

    def _slot_decoder(self, gen: GenerationSpec, eos_ids: set[int], prefix=(),
                      prefix_kv=None, state=None, matchers=None) -> SlotDecoder:
        return SlotDecoder(self.model, gen, eos_ids=eos_ids, pad_id=self.pad_id,
                           slots=self.batch_size, max_batch_tokens=self.max_batch_tokens,
                           hit_stop=self._hit_stop, prefix=prefix, prefix_kv=prefix_kv,
                           state=state, graph_factory=self.graph_factory if state is not None
                           else None, matchers=matchers, logprobs=gen.logprobs)

    @property
    def grammars(self):
        """The compiled constraints of this replica (``structured.Grammars``), or None."""
        return self._grammars

    def compile(self, constraint) -> None:
        """Compile a constraint for this replica's tokenizer now (cached); raises
        structured.ConstraintError if it cannot serve it."""
        self._grammar_set().compile(constraint)

    def _grammar_set(self):
        if self._grammars is None:
            from batchgen.engine.masks import Grammars

            self._grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().weight
                                      .shape[0], self.tokenizer.eos_token_id)
        return self._grammars

    def _matchers(self, requests: list[Request]):
        """One constraint matcher per request of a run, or None when none is constrained."""
        if all(r.constraint is None for r in requests):
            return None
        from batchgen.engine.masks import Matchers

        return Matchers(self._grammar_set(), [r.constraint for r in requests], self._gate,
                        [r.prompt_ids for r in requests])

    @property
    def graphs(self):
        """The decode steps' CUDA graphs (``graphs.StepGraphs``), or None."""
        state = self._state.get("slots")
        return None if state is None else state.graphs

    def _choose_path(self, path: str) -> tuple[str, str]:
        if path == "hf":
            return "hf", "asked for"
        context = context_length(self.model.config, getattr(self.tokenizer, "model_max_length", None))
        greedy = GenerationSpec(max_new_tokens=probe.NEW_TOKENS, ignore_eos=True)
        ok, why = probe.probe(self.model, lambda: self._slot_decoder(greedy, set()), context)
        if ok:
            return "slots", ""
        if path == "slots":
            raise ValueError(f"the slot path cannot serve this model: {why}")
        log.warning("batchgen: this model runs on the Hugging Face path (slower): %s", why)
        return "hf", why

    def set_prefix(self, prefix: tuple[int, ...]) -> None:
        """The job's shared prompt prefix (``worker.job_prefix``); the slot path prefills it
        once and every prompt that starts with it reuses its keys."""
        # Off where the rotary depends on the length: Hugging Face rotates a prompt's tokens by
        # the prompt's length, a prefix computed once would get the prefix's.
        prefix = tuple(prefix) if self.path == "slots" and not by_length(self.model) else ()
        if prefix != self._prefix:
            self._prefix, self._prefix_kv = prefix, {}

    @property
    def prefix(self) -> tuple[int, ...]:
        return self._prefix

    # -- prompts ---------------------------------------------------------------------------

    def tokenize(self, texts: list[str], *, chat: bool = False) -> list[list[int]]:
        if not texts:
            return []
        # A chat template already writes the model's special tokens; adding them again doubles BOS.
        return self.tokenizer(list(texts), add_special_tokens=not chat)["input_ids"]

    def tokenize_continuation(self, texts: list[str]) -> list[list[int]]:
        """Tokens of texts that follow a prompt (scored completions): no special tokens."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def fit(self, ids: list[int]) -> tuple[int, ...]:
        """Apply model.max_input_tokens and model.truncation; raises PromptTooLong."""
        return fit_prompt(ids, self.max_input_tokens, self.truncation)

    # -- generation ------------------------------------------------------------------------

    def plan_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches for the Hugging Face path: one prompt width
        (``hfdecode.prompt_width``, a function of the prompt alone) per batch, widest first,
        under both limits. The slot path takes every request at once (it admits them into
        slots as they free up)."""
        widths = [prompt_width(n) for n in lengths]
        batches: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: (-widths[i], i)):
            last = batches[-1] if batches else []
            cost = (len(last) + 1) * (widths[i] + self.gen.max_new_tokens)
            if (last and widths[last[0]] == widths[i] and len(last) < self.batch_size
                    and cost <= self.max_batch_tokens):
                last.append(i)
            else:
                batches.append([i])
        return batches

    def generate(self, requests: list[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        if self.path == "slots":
            batches = [list(range(len(requests)))] if requests else []
        else:
            batches = self.plan_batches([len(r.prompt_ids) for r in requests])
        for batch in batches:
            for i, completion in zip(batch, run_or_split([requests[i] for i in batch], self._run,
                                                          self._generate_alone, self.stats)):
                results[i] = completion
        return results  # type: ignore[return-value]

    def feed(self):
        """The slot path's decode loop shared across calls and threads (``feed.EngineFeed``),
        made on first use; None on the Hugging Face path."""
        from batchgen.engine.feed import EngineFeed

        return EngineFeed.of(self, _under_constraint) if self.path == "slots" else None

    def _generate_alone(self, requests: list[Request], problem: str, non_finite: bool
                        ) -> list[Completion]:
        """One request that failed alone: non-finite logits in half precision are retried once
        with the weights in float32; else an error completion."""
        if non_finite and any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.stats.float32_retries += 1
            try:
                with in_float32(self.model):
                    return self._run(requests)
            except (RuntimeError, MemoryError) as e:
                failure(e)  # anything but non-finite logits or out of memory propagates
                problem = (f"{e} (also in float32)" if isinstance(e, NonFiniteLogits)
                           else f"{problem}; the float32 retry ran out of memory")
            free_memory()
        return [Completion(None, "error", 0, [], error=f"generation failed alone: {problem}")]

    def _run(self, requests: list[Request]) -> list[Completion]:
        started = time.perf_counter()
        s = self.stats
        matchers = self._matchers(requests)
        if self.path == "slots":
            decoder = self._slot_decoder(self.gen, self.eos_ids, self._prefix, self._prefix_kv,
                                         self._state, matchers)
            results = decoder.run(requests)
            for mine, theirs in ENGINE_COUNTERS.items():
                setattr(s, mine, getattr(s, mine) + getattr(decoder.stats, theirs))
        else:
            decoder = HFDecoder(self.model, self.gen, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                hit_stop=self._hit_stop, matchers=matchers,
                                logprobs=self.gen.logprobs)
            results = decoder.run(requests)
            s.padded_prompt_positions += decoder.padded_positions
            s.decode_steps += decoder.steps
        completions = [self._finish(ids, reason, lps) for ids, reason, lps in results]
        if matchers is not None:
            completions = [_under_constraint(c, matchers, i) for i, c in enumerate(completions)]
        s.batches += 1
        s.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        s.generated_tokens += sum(c.generated_tokens for c in completions)
        s.seconds += time.perf_counter() - started
        return completions

    def _hit_stop(self, ids: list[int]) -> bool:
        if not self.gen.stop:
            return False
        tail = self.tokenizer.decode(ids[-self._stop_window :], skip_special_tokens=True)
        return any(s in tail for s in self.gen.stop)

    def _finish(self, ids: list[int], reason: str, lps: list) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.gen.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        logprobs = None
        if self.gen.logprobs is not None:
            # The logprobs cover the tokens of the text: an end-of-sequence token is not text
            # (OpenAI's end with the content too), so a row's cumulative_logprob is the score
            # of its text.
            listed = len(ids) - (1 if ids and ids[-1] in self.eos_ids else 0)
            logprobs = self._token_logprobs(ids[:listed], lps[:listed])
        return Completion(text, reason, len(ids), ids, logprobs=logprobs)

    def _token_logprobs(self, ids, lps) -> list[TokenLogprob]:
        """(logprob, top ids, top logprobs) per token, with each token's text."""
        text = self._texts([*ids, *(t for _, top, _ in lps for t in top)])
        return [TokenLogprob(t, text[t], lp, tuple((i, text[i], v) for i, v in zip(top, vals)))
                for t, (lp, top, vals) in zip(ids, lps)]

    def _texts(self, ids) -> dict[int, str]:
        """Each token's own text (decoded alone), cached per engine."""
        for i in {i for i in ids if i not in self._token_text}:  # at most the vocabulary
            self._token_text[i] = self.tokenizer.decode([i], skip_special_tokens=False)
        return self._token_text

    # -- scoring ---------------------------------------------------------------------------

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        """Teacher-forced logprobs of each request's completion after its prompt, with the
        top-``generation.logprobs`` alternatives of each token when asked for. Batched under
        the token budget, the job prefix's keys shared (slot path). A batch that runs out of
        memory or goes non-finite is split in halves; a request that fails alone gets an
        error."""
        if not requests:
            return []
        started = time.perf_counter()
        out = run_or_split(list(requests), self._score_batch, lambda _, problem, __: [
            Score(None, error=f"scoring failed alone: {problem}")], self.stats)
        self.stats.batches += 1
        self.stats.prompt_tokens += sum(len(r.prompt_ids) + len(r.completion_ids)
                                        for r in requests)
        self.stats.seconds += time.perf_counter() - started
        return out

    def _score_batch(self, requests: list[ScoreRequest]) -> list[Score]:
        items = [(r.prompt_ids, r.completion_ids) for r in requests]
        top = self.gen.logprobs
        if self.path == "slots":
            decoder = self._slot_decoder(self.gen, self.eos_ids, self._prefix, self._prefix_kv,
                                         self._state)
            results = score_slots(decoder, items, top)
            self.stats.padded_prompt_positions += decoder.stats.prefill_positions
            self.stats.prefix_positions += decoder.stats.prefix_positions
        else:
            decoder = HFDecoder(self.model, self.gen, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                hit_stop=self._hit_stop)
            results = [None] * len(items)
            for batch in self.plan_batches([len(p) + len(c) for p, c in items]):
                for i, r in zip(batch, score_hf(decoder, [items[i] for i in batch], top)):
                    results[i] = r
            self.stats.padded_prompt_positions += decoder.padded_positions
        return [Score(self._token_logprobs(list(r.completion_ids), lps))
                for r, lps in zip(requests, results)]


def _under_constraint(c: Completion, matchers, i: int) -> Completion:
    """A constrained row's completion as the constraint left it: an error row when llguidance
    stopped the row (a limit it hit; it then allows only EOS, so the text is cut, not the
    constraint's), else flagged ``truncated`` when it ended incomplete."""
    problem = matchers.error(i)
    if problem is not None:
        return Completion(None, "error", c.generated_tokens, c.token_ids, error=(
            f"generation.structured: llguidance stopped this row after {c.generated_tokens} "
            f"tokens: {problem}"))
    c.truncated = matchers.truncated(i)
    return c


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
