"""The echo engine: no model. For dry runs of a job's input, storage and cluster
(``model.engine: echo``), and for measuring the driver."""

from __future__ import annotations

from batchgen.engine.completions import (
    Completion, EngineStats, Request, Score, ScoreRequest, TokenLogprob, fit_prompt
)
from batchgen.spec import GenerationSpec


class EchoEngine:
    """No model: each request gets the fixed text ``[echo]``, one token, finish_reason 'stop'.
    Prompts are "tokenized" by whitespace so budgets and counts still mean something."""

    TEXT = "[echo]"

    def __init__(self, generation: GenerationSpec, max_input_tokens: int | None = None,
                 truncation: str = "left"):
        self.gen = generation
        self.tokenizer = None
        self.max_input_tokens = max_input_tokens
        self.truncation = truncation
        self.stats = EngineStats()

    def tokenize(self, texts: list[str], *, chat: bool = False) -> list[list[int]]:
        return [list(range(len(t.split()))) for t in texts]

    def tokenize_continuation(self, texts: list[str]) -> list[list[int]]:
        return self.tokenize(texts)

    def fit(self, ids: list[int]) -> tuple[int, ...]:
        return fit_prompt(ids, self.max_input_tokens, self.truncation)

    def generate(self, requests: list[Request]) -> list[Completion]:
        self.stats.batches += 1 if requests else 0
        self.stats.generated_tokens += len(requests)
        lps = None if self.gen.logprobs is None else [TokenLogprob(0, self.TEXT, 0.0)]
        return [Completion(self.TEXT, "stop", 1, [0], logprobs=lps) for _ in requests]

    def compile(self, constraint) -> None:
        """No tokenizer, nothing to compile: constraints are ignored."""

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        """Every completion token gets logprob 0 (no model)."""
        return [Score([TokenLogprob(t, "", 0.0) for t in r.completion_ids]) for r in requests]
