"""The engine's contract as data: requests in, completions and scores out, and the engine's
counters. No torch, so the output side (``rows``) reads completions without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PromptTooLong(ValueError):
    """The prompt is longer than model.max_input_tokens and truncation is 'error'."""


def fit_prompt(ids: list[int], limit: int | None, truncation: str) -> tuple[int, ...]:
    """A prompt's tokens within ``limit`` (model.max_input_tokens), cut from the side
    ``truncation`` says (model.truncation: left keeps the end); raises PromptTooLong for
    ``error``."""
    if limit is None or len(ids) <= limit:
        return tuple(ids)
    if truncation == "error":
        raise PromptTooLong(
            f"prompt has {len(ids)} tokens, more than model.max_input_tokens={limit} "
            "(set model.truncation to left or right to cut it instead)"
        )
    return tuple(ids[-limit:] if truncation == "left" else ids[:limit])


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    seed: int = 0
    constraint: Any = None  # a structured.Constraint: tokens it does not allow are masked


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # the likeliest tokens: (id, text, logprob)


@dataclass
class Completion:
    text: str | None
    finish_reason: str  # "stop" | "length" | "error"
    generated_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    error: str | None = None
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # generation.logprobs
    truncated: bool = False  # constrained, and ended before it was complete (max_new_tokens)

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass(frozen=True)
class ScoreRequest:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # at least one token


@dataclass
class Score:
    logprobs: list[TokenLogprob] | None  # one per completion token; None on error
    error: str | None = None

    @property
    def logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass
class EngineStats:
    batches: int = 0  # decoder runs
    prompt_tokens: int = 0
    padded_prompt_positions: int = 0  # prompt positions computed (padding and the prefix included)
    prefix_positions: int = 0  # of which for the job prefix (once per replica)
    generated_tokens: int = 0
    seconds: float = 0.0
    splits: int = 0  # batches split in halves after running out of memory or going non-finite
    float32_retries: int = 0
    decode_steps: int = 0
    row_steps: int = 0  # live rows summed over decode steps (slot path)
    slot_steps: int = 0  # slots summed over decode steps
    busy_row_steps: int = 0  # the same, counted only while requests waited for a slot
    busy_slot_steps: int = 0

    @property
    def occupancy(self) -> float | None:
        """Mean live rows / slots over decode steps (slot path)."""
        return self.row_steps / self.slot_steps if self.slot_steps else None

    @property
    def busy_occupancy(self) -> float | None:
        """Occupancy while requests were still waiting for a slot."""
        return self.busy_row_steps / self.busy_slot_steps if self.busy_slot_steps else None
