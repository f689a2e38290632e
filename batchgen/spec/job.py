"""The whole job spec: its sections, and the rules that cross them."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from batchgen.spec.base import _Section
from batchgen.spec.generation import GenerationSpec
from batchgen.spec.input import InputSpec
from batchgen.spec.model import ModelSpec
from batchgen.spec.output import OutputSpec
from batchgen.spec.resources import ResourcesSpec, StorageSpec

# What shapes sampling, which a score job does not do: each must keep its default there.
_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "stop": (),
             "ignore_eos": False, "dedupe": False, "reasoning_end": None}


class JobSpec(_Section):
    name: str | None = Field(default=None, description="A name for logs and the manifest.")
    mode: Literal["generate", "score"] = Field(
        default="generate",
        description="'score': no sampling; each row's input.completion_column is scored under its "
        "prompt (teacher-forced log-likelihood, completion_tokens, perplexity).",
    )
    input: InputSpec
    model: ModelSpec
    generation: GenerationSpec = GenerationSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()

    @model_validator(mode="after")
    def _chunking_is_one_sample(self) -> JobSpec:
        if self.input.long_documents == "chunk" and self.generation.n != 1:
            raise ValueError("input.long_documents: chunk makes one summary per row; use generation.n: 1")
        return self

    @model_validator(mode="after")
    def _mode_fits(self) -> JobSpec:
        g, i = self.generation, self.input
        if self.mode == "score":
            if not i.completion_column:
                raise ValueError("mode: score needs input.completion_column (the text to score)")
            if g.n != 1 or g.structured is not None or i.long_documents == "chunk":
                raise ValueError("mode: score scores one given completion per row: it takes no "
                                 "generation.n > 1, generation.structured or long_documents: chunk")
            ignored = [k for k, default in _SAMPLING.items() if getattr(g, k) != default]
            if ignored:
                reset = " ".join(f"--set generation.{k}={json.dumps(_SAMPLING[k])}" for k in ignored)
                raise ValueError(
                    f"mode: score takes no {', '.join('generation.' + k for k in ignored)}: "
                    "scores are the model's own log-probabilities of the given completion, and "
                    "nothing is sampled, stopped or deduplicated; remove them (an output an "
                    f"earlier batchgen scored with them set resumes with {reset} --force: they "
                    "never changed a score)")
        elif i.completion_column is not None:
            raise ValueError("input.completion_column needs mode: score")
        s = g.structured
        if s is not None and s.tool_call:
            if not i.tools:
                raise ValueError("generation.structured.tool_call needs input.tools")
            from batchgen.spec.constraints import ConstraintError, constraint_for

            try:
                constraint_for(s, i.tools)
            except ConstraintError as e:
                raise ValueError(f"generation.structured.{e} (input.tools)") from None
        clash = [c for c in i.columns if c in self.optional_columns()]
        if clash:
            raise ValueError(f"input.columns {clash} clash with output columns this job writes; "
                             "rename them in the input")
        return self

    def optional_columns(self) -> list[str]:
        """The output columns this job adds to the nine every row has, in order (their types:
        ``rows.OPTIONAL_FIELDS``). ``parsed``/``parse_error`` come with output.parse: json, a
        constraint (is the output complete under it?) or tools (are the calls valid?)."""
        g, i, o = self.generation, self.input, self.output
        if self.mode == "score":
            return ["completion", "completion_tokens", "completion_logprob", "perplexity"] + (
                ["logprobs"] if g.logprobs is not None else [])
        cols = []
        if o.parse == "json" or g.structured is not None or i.tools:
            cols += ["parsed", "parse_error"]
        if i.long_documents == "chunk":
            cols += ["document_tokens", "chunks"]
        if g.logprobs is not None:
            cols += ["logprobs", "cumulative_logprob"]
        if i.tools:
            cols.append("tool_calls")
        if g.reasoning_end is not None:
            cols.append("reasoning")
        return cols

    @model_validator(mode="after")
    def _context_fits(self) -> JobSpec:
        if self.resources.max_batch_tokens < self.generation.max_new_tokens + 1:
            raise ValueError(
                "resources.max_batch_tokens must exceed generation.max_new_tokens, "
                "or no prompt fits in a batch"
            )
        return self
