"""``generation``: how tokens are chosen, and constraints on what they spell."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from batchgen.spec.base import _Section

MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's top_logprobs limit too)


class StructuredSpec(_Section):
    """Constrained decoding: exactly one key. Tokens the constraint does not allow are masked
    before sampling, and the end-of-sequence token only where the constraint may end."""

    json_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema every generation satisfies."
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)

    json_object: bool = Field(default=False, alias="json",
                              description="true: every generation is a JSON object.")
    regex: str | None = Field(default=None, description="A regular expression every generation "
                              "matches whole.")
    choice: tuple[str, ...] | None = Field(
        default=None, description="Every generation is exactly one of these strings."
    )
    grammar: str | None = Field(
        default=None,
        description="A Lark grammar (llguidance's dialect: EBNF-like rules, /regex/ terminals, "
        "%json {schema} embeds) whose start rule every generation matches.",
    )
    json_schema_column: str | None = Field(
        default=None,
        description="Column holding each row's own JSON Schema (JSON text or a struct); a row "
        "whose schema is invalid becomes an error row.",
    )
    tool_call: bool = Field(
        default=False,
        description="true: every generation is one call of one of input.tools, its arguments "
        "valid against that tool's parameters schema.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredSpec:
        given = [k for k in ("json_schema", "regex", "choice", "grammar", "json_schema_column")
                 if getattr(self, k) is not None] + [k for k in ("json_object", "tool_call")
                                                     if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of json_schema, json, regex, choice, grammar, "
                f"json_schema_column, tool_call (got {', '.join(given).replace('json_object', 'json') or 'none'})")
        if self.choice is not None and (not self.choice or any(c == "" for c in self.choice)):
            raise ValueError("choice needs at least one non-empty string")
        from batchgen.spec.constraints import check_spec

        check_spec(self)
        return self


class GenerationSpec(_Section):
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0 means greedy decoding."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k likeliest tokens; 0 = off.")
    n: int = Field(default=1, ge=1, le=1024, description="Samples per input row.")
    seed: int = Field(
        default=0,
        ge=0,
        description="Job seed. Each row's sampling seed derives from (seed, row_id, sample_index), "
        "so reruns and retries give the same text whatever the batching.",
    )
    stop: tuple[str, ...] = Field(
        default=(), description="Generation is cut at the first of these strings."
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, description="CTRL-style penalty on tokens already seen; 1 = off."
    )
    ignore_eos: bool = Field(
        default=False,
        description="Generate exactly max_new_tokens, past the model's end-of-sequence token "
        "(stop strings still apply). For benchmarks and load tests.",
    )
    dedupe: bool = Field(
        default=False,
        description="Drop a sample whose text repeats an earlier sample of the same row exactly "
        "(counted as duplicates_removed in the done markers and manifest).",
    )

    structured: StructuredSpec | None = Field(
        default=None,
        description="Constrained decoding (see StructuredSpec): the output is guaranteed to have "
        "the given form, except when max_new_tokens cuts it (finish_reason: length, and a "
        "parse_error that says truncated).",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Per generated token, its id, text and log-probability plus the K likeliest "
        "alternatives (0: the chosen token only), and each row's cumulative_logprob. From the "
        "model's distribution before temperature, top-k/top-p, repetition penalty and any "
        "constraint. With mode: score, the per-token log-probabilities of the completion. "
        "false is off (as null) and true is 0, as OpenAI's logprobs flag.",
    )
    reasoning_end: str | None = Field(
        default=None,
        description="The marker that ends a reasoning model's thinking, e.g. '</think>': the text "
        "before it goes to the `reasoning` column, the rest to `generation`, and a constraint "
        "applies only after it.",
    )

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_flag(cls, value: Any) -> Any:
        # `logprobs: false` read as K = 0 turned them on.
        return {False: None, True: 0}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _sampling_for_many(self) -> GenerationSpec:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                "n > 1 needs temperature > 0: greedy decoding would give n identical samples"
            )
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.structured is not None and self.ignore_eos:
            raise ValueError("structured needs ignore_eos: false: a finished constraint allows "
                             "only the end-of-sequence token")
        if self.structured is not None and self.stop:
            raise ValueError("structured takes no stop strings: a stop string would cut the "
                             "output its constraint shapes (the constraint ends it already)")
        if self.reasoning_end is not None and not self.reasoning_end.strip():
            raise ValueError("reasoning_end must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
