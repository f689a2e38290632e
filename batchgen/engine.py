"""Batched decoding with a Hugging Face causal LM. No Ray, no storage: text in, text out.

Contract: ``Engine.generate(requests)`` returns one ``Completion`` per ``Request`` in the same
order. A request's output depends only on its prompt tokens and its seed, not on which other
requests share its batch: padding is on the left with a matching attention mask and position ids,
and sampling (``sampling.Sampler``) draws noise from a ``torch.Generator`` of the request's own.
Loading is ``loading.py``.

Batches are cut from requests sorted by prompt length, under both a row limit and a token budget
(rows x (longest prompt + max_new_tokens)), so padding stays small and long prompts get small
batches. Rows that finish are dropped from the batch and its KV cache as they go.

Back-off: a batch that runs out of memory, or whose logits turn NaN/+inf (fp16 overflow), is
split in halves and each half retried; a single request that still fails is retried once with the
weights in float32 (non-finite logits only), else returned as an error completion. Per-request
seeds make the split invisible in the outputs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from batchgen.loading import load_model
from batchgen.modelcheck import context_length, input_budget
from batchgen.sampling import Sampler
from batchgen.spec import GenerationSpec, ModelSpec, ResourcesSpec


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    seed: int = 0


@dataclass
class Completion:
    text: str | None
    finish_reason: str  # "stop" | "length" | "error"
    generated_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    error: str | None = None


@dataclass
class EngineStats:
    batches: int = 0
    prompt_tokens: int = 0
    padded_prompt_positions: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    splits: int = 0  # batches split in halves after running out of memory or going non-finite
    float32_retries: int = 0


class NonFiniteLogits(RuntimeError):
    """NaN or +inf in the logits: the model overflowed in its dtype."""


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PromptTooLong(ValueError):
    """The prompt is longer than model.max_input_tokens and truncation is 'error'."""


def load_engine(model: ModelSpec, generation: GenerationSpec, resources: ResourcesSpec):
    if model.engine == "echo":
        return EchoEngine(generation, model.max_input_tokens)
    return Engine.load(model, generation, resources)


class EchoEngine:
    """No model: each request gets the fixed text ``[echo]``, one token, finish_reason 'stop'.
    Prompts are "tokenized" by whitespace so budgets and counts still mean something."""

    TEXT = "[echo]"

    def __init__(self, generation: GenerationSpec, max_input_tokens: int | None = None):
        self.gen = generation
        self.tokenizer = None
        self.max_input_tokens = max_input_tokens
        self.truncation = "left"
        self.stats = EngineStats()

    def tokenize(self, texts: list[str], *, chat: bool = False) -> list[list[int]]:
        return [list(range(len(t.split()))) for t in texts]

    def fit(self, ids: list[int]) -> tuple[int, ...]:
        limit = self.max_input_tokens
        return tuple(ids if limit is None else ids[-limit:])

    def generate(self, requests: list[Request]) -> list[Completion]:
        self.stats.batches += 1 if requests else 0
        self.stats.generated_tokens += len(requests)
        return [Completion(self.TEXT, "stop", 1, [0]) for _ in requests]


class Engine:
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
        self.eos_ids = set() if generation.ignore_eos else _eos_ids(model, tokenizer)
        self.stats = EngineStats()
        self._keep_last = True
        self._can_stack_caches = True
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

    # -- prompts ---------------------------------------------------------------------------

    def tokenize(self, texts: list[str], *, chat: bool = False) -> list[list[int]]:
        # A chat template already writes the model's special tokens; adding them again doubles BOS.
        return self.tokenizer(list(texts), add_special_tokens=not chat)["input_ids"]

    def fit(self, ids: list[int]) -> tuple[int, ...]:
        """Apply model.max_input_tokens and model.truncation; raises PromptTooLong."""
        limit = self.max_input_tokens
        if limit is None or len(ids) <= limit:
            return tuple(ids)
        if self.truncation == "error":
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens, more than model.max_input_tokens={limit} "
                "(set model.truncation to left or right to cut it instead)"
            )
        return tuple(ids[-limit:] if self.truncation == "left" else ids[:limit])

    # -- generation ------------------------------------------------------------------------

    def plan_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches, longest prompts first, under both limits."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            longest_if = max(longest, lengths[i])
            cost = (len(current) + 1) * (longest_if + self.gen.max_new_tokens)
            if current and (len(current) >= self.batch_size or cost > self.max_batch_tokens):
                batches.append(current)
                current, longest_if = [], lengths[i]
            current.append(i)
            longest = longest_if
        if current:
            batches.append(current)
        return batches

    def generate(self, requests: list[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        for batch in self.plan_batches([len(r.prompt_ids) for r in requests]):
            for i, completion in zip(batch, self._generate_or_split([requests[i] for i in batch])):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_or_split(self, requests: list[Request]) -> list[Completion]:
        try:
            return self._generate_batch(requests)
        except NonFiniteLogits as e:
            problem, non_finite = str(e), True
        except (RuntimeError, MemoryError) as e:
            if not (isinstance(e, MemoryError) or _is_oom(e)):
                raise
            problem, non_finite = f"out of memory: {str(e).splitlines()[0][:200]}", False
        _free_memory()
        if len(requests) > 1:
            self.stats.splits += 1
            half = len(requests) // 2
            return self._generate_or_split(requests[:half]) + self._generate_or_split(requests[half:])
        if non_finite and self.model.dtype != torch.float32:
            self.stats.float32_retries += 1
            try:
                with self._in_float32():
                    return self._generate_batch(requests)
            except NonFiniteLogits as e:
                problem = f"{e} (also in float32)"
            except (RuntimeError, MemoryError) as e:
                if not (isinstance(e, MemoryError) or _is_oom(e)):
                    raise
                problem = f"{problem}; the float32 retry ran out of memory"
            _free_memory()
        return [Completion(None, "error", 0, [], error=f"generation failed alone: {problem}")]

    @contextmanager
    def _in_float32(self):
        """Weights upcast to float32 for the block, then restored (fp16/bf16 -> fp32 -> back is
        exact)."""
        dtype = self.model.dtype
        self.model.float()
        try:
            yield
        finally:
            self.model.to(dtype)

    @torch.inference_mode()
    def _generate_batch(self, requests: list[Request]) -> list[Completion]:
        started = time.perf_counter()
        B = len(requests)
        L = max(len(r.prompt_ids) for r in requests)
        dev = self.device

        # 1. Left-pad prompts; position ids count only real tokens.
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for row, r in enumerate(requests):
            n = len(r.prompt_ids)
            input_ids[row, L - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[row, L - n :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        sampler = Sampler(self.gen, requests, input_ids, mask, dev)

        # 2. Prefill, in groups of similar length whose KV caches are then left-padded and
        # stacked: the decode batch stays whole while prompt padding stays small.
        lengths = [len(r.prompt_ids) for r in requests]
        cache, logits, padded = self._grouped_prefill(input_ids, mask, positions, lengths)
        next_pos = positions[:, -1:] + 1

        # 3. Decode until every row has stopped; finished rows leave the batch.
        active = list(range(B))  # batch row -> request index
        generated: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        for step in range(self.gen.max_new_tokens):
            tokens = sampler.choose(logits).tolist()
            still = []
            for row, (req, tok) in enumerate(zip(active, tokens)):
                generated[req].append(tok)
                if tok in self.eos_ids or self._hit_stop(generated[req]):
                    reasons[req] = "stop"
                else:
                    still.append(row)
            if not still or step == self.gen.max_new_tokens - 1:
                break
            step_tokens = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]
            if len(still) < len(active):
                keep = torch.tensor(still, device=dev)
                cache.batch_select_indices(keep)
                mask, next_pos, step_tokens = mask[keep], next_pos[keep], step_tokens[keep]
                sampler.select(keep, still)
                active = [active[row] for row in still]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=step_tokens,
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits = _last_logits(out)
            next_pos = next_pos + 1
            sampler.observe(step_tokens[:, 0])

        # 4. Detokenize and cut at the first stop string.
        completions = [self._finish(ids, reason) for ids, reason in zip(generated, reasons)]
        s = self.stats
        s.batches += 1
        s.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        s.padded_prompt_positions += padded
        s.generated_tokens += sum(c.generated_tokens for c in completions)
        s.seconds += time.perf_counter() - started
        return completions

    def _grouped_prefill(self, input_ids, mask, positions, lengths):
        """(cache, last logits, prompt positions computed). Rows come longest first; a new
        group starts where adding a row would leave less than PREFILL_FILL of the group's
        positions real tokens."""
        B, L = input_ids.shape
        groups, start = [], 0
        for i in range(1, B + 1):
            if i == B or sum(lengths[start:i + 1]) < PREFILL_FILL * (i + 1 - start) * lengths[start]:
                groups.append((start, i))
                start = i
        if len(groups) > 1 and not self._can_stack_caches:
            groups = [(0, B)]
        if len(groups) == 1:
            out = self._prefill(input_ids, mask, positions)
            return out.past_key_values, _last_logits(out), B * L
        outs = []
        for a, b in groups:
            width = max(lengths[a:b])
            outs.append((self._prefill(input_ids[a:b, L - width:], mask[a:b, L - width:],
                                       positions[a:b, L - width:]), width))
        try:
            cache = _stack_left_padded([o.past_key_values for o, _ in outs], L)
        except (AttributeError, TypeError):  # a cache that is not plain per-layer K/V tensors
            self._can_stack_caches = False
            out = self._prefill(input_ids, mask, positions)
            return out.past_key_values, _last_logits(out), B * L
        logits = torch.cat([_last_logits(o) for o, _ in outs])
        return cache, logits, sum((b - a) * w for (a, b), (_, w) in zip(groups, outs))

    def _prefill(self, input_ids, mask, positions):
        """The prompt pass. Only the last position's logits are needed: asking for just those
        skips the LM head over every prompt token (rows x length x vocab multiply-adds)."""
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        if self._keep_last:
            try:
                return self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._keep_last = False
        return self.model(**kwargs)

    def _hit_stop(self, ids: list[int]) -> bool:
        if not self.gen.stop:
            return False
        tail = self.tokenizer.decode(ids[-self._stop_window :], skip_special_tokens=True)
        return any(s in tail for s in self.gen.stop)

    def _finish(self, ids: list[int], reason: str) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.gen.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Completion(text, reason, len(ids), ids)


PREFILL_FILL = 0.9  # least share of real tokens among the prompt positions of a prefill group


def _stack_left_padded(caches: list[Any], length: int) -> Any:
    """One cache for all rows: each group's keys/values left-padded (zeros, masked out) to
    ``length`` and stacked along the batch, layer by layer, into the first group's cache."""
    import torch.nn.functional as F

    merged = caches[0]
    for i, layer in enumerate(merged.layers):
        for name in ("keys", "values"):
            parts = [getattr(c.layers[i], name) for c in caches]
            setattr(layer, name, torch.cat(
                [F.pad(t, (0, 0, length - t.shape[-2], 0)) for t in parts], dim=0))
    return merged


def _last_logits(out: Any) -> torch.Tensor:
    logits = out.logits[:, -1, :].float()
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise NonFiniteLogits("the model produced NaN/inf logits")
    return logits


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
