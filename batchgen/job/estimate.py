"""What ``batchgen plan`` prints: the plan, checked as a run would check it, and a prompt-token
estimate, without a model and without torch.

Contract: ``plan_summary`` makes the plan and runs the same checks a run makes before any replica
starts (``prepare.preflight``: the model's files, the chunk window, unique ids), so a job that
plans is a job that starts. ``estimate_prompt_tokens`` renders the first rows of the input
exactly as a replica would (template, few-shot examples, chat template) and counts their tokens
with the model's own ``tokenizer.json`` (``batchgen.io.modelcheck.light_tokenizer``,
torch-free); it reads the tokenizer files only, never the weights, and says how many sampled
rows would be error rows and why. Only a model without ``tokenizer.json`` (a slow,
sentencepiece-only tokenizer) falls back to transformers, which imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchgen.io.inputs import read_rows
from batchgen.io.modelcache import local_model
from batchgen.io.storage import input_options
from batchgen.job.plan import Plan, make_plan
from batchgen.job.prepare import preflight
from batchgen.shard import prompts
from batchgen.shard.rows import row_dicts
from batchgen.spec import JobSpec


@dataclass(frozen=True)
class Estimate:
    rows: int  # rows sampled (from the first shard)
    tokens_per_row: float  # mean prompt tokens of the sampled rows that render; 0.0 if none
    error_rows: int  # sampled rows that would be error rows
    first_error: str | None  # the first of their messages


def estimate_prompt_tokens(spec: JobSpec, plan: Plan, sample: int = 256) -> Estimate:
    """Prompt tokens per row over the first ``sample`` rows of the first shard."""
    if not plan.shards:
        return Estimate(0, 0.0, 0, None)
    tokenizer = None if spec.model.engine == "echo" else _tokenizer(spec)
    first = plan.shards[0]
    table = read_rows(first.file, first.row_start, min(sample, first.row_count),
                      prompts.needed_columns(spec.input), input_options(spec), spec.input.format)
    rendered, errors = prompts.render_prompts(spec, *row_dicts(table), tokenizer)
    failed = [e for e in errors if e is not None]
    texts = [t for t in rendered if t is not None]
    if not texts:
        per_row = 0.0
    elif tokenizer is None:  # the echo engine counts words
        per_row = sum(len(t.split()) for t in texts) / len(texts)
    else:
        ids = tokenizer(texts, add_special_tokens=not spec.input.chat)["input_ids"]
        per_row = sum(len(x) for x in ids) / len(ids)
    return Estimate(len(rendered), per_row, len(failed), failed[0] if failed else None)


def plan_summary(spec: JobSpec, sample: int = 256) -> tuple[Plan, dict[str, Any]]:
    """The plan, checked as ``batchgen run`` checks it before any work, and its summary."""
    plan = make_plan(spec)
    preflight(spec, plan, new_plan=True)
    est = estimate_prompt_tokens(spec, plan, sample=sample)
    samples = plan.total_rows * spec.generation.n
    return plan, {
        "files": len(plan.files),
        "rows": plan.total_rows,
        "shards": len(plan.shards),
        "samples": samples,
        "prompt_tokens_per_row": round(est.tokens_per_row, 1),
        "prompt_tokens_estimate": round(est.tokens_per_row * samples),
        "max_new_tokens_total": samples * spec.generation.max_new_tokens,
        "sampled_rows": est.rows,
        "sampled_error_rows": est.error_rows,
        "first_error": est.first_error,
        "fingerprint": plan.fingerprint,
    }


def _tokenizer(spec: JobSpec) -> Any:
    from batchgen.io.modelcheck import light_tokenizer

    model = local_model(spec, weights=False)[0]
    tokenizer = light_tokenizer(model)
    if tokenizer is None:  # no tokenizer.json: only transformers can read it
        from batchgen.engine.loading import load_tokenizer as load_with_transformers

        tokenizer = load_with_transformers(model)
    return tokenizer
