"""The prompt-token estimate ``batchgen plan`` prints, without a model and without torch.

Contract: ``estimate_prompt_tokens`` renders the first rows of the input exactly as a replica
would (template, few-shot examples, chat template) and counts their tokens with the model's own
``tokenizer.json`` (``batchgen.io.modelcheck.light_tokenizer``, torch-free); it reads the tokenizer
files only, never the weights. Neither torch nor ``batchgen.engine`` is imported here, so
``batchgen plan`` stays quick; only a model without ``tokenizer.json`` (a slow, sentencepiece-only
tokenizer) falls back to transformers, which imports torch.
"""

from __future__ import annotations

from typing import Any

from batchgen.io.inputs import read_rows
from batchgen.io.modelcache import local_model
from batchgen.io.storage import input_options
from batchgen.job.plan import Plan
from batchgen.shard import prompts
from batchgen.shard.rows import row_dicts
from batchgen.spec import JobSpec


def estimate_prompt_tokens(spec: JobSpec, plan: Plan, sample: int = 256) -> float:
    """Mean prompt tokens per row over the first ``sample`` rows of the first shard (rows that
    would be error rows are left out; 0.0 when there are none)."""
    if not plan.shards:
        return 0.0
    tokenizer = None if spec.model.engine == "echo" else _tokenizer(spec)
    first = plan.shards[0]
    table = read_rows(first.file, first.row_start, min(sample, first.row_count),
                      prompts.needed_columns(spec.input), input_options(spec), spec.input.format)
    texts = [t for t in prompts.render_prompts(spec, *row_dicts(table), tokenizer)[0]
             if t is not None]
    if not texts:
        return 0.0
    if tokenizer is None:  # the echo engine counts words
        return sum(len(t.split()) for t in texts) / len(texts)
    ids = tokenizer(texts, add_special_tokens=not spec.input.chat)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)


def _tokenizer(spec: JobSpec) -> Any:
    from batchgen.io.modelcheck import light_tokenizer

    model = local_model(spec, weights=False)[0]
    tokenizer = light_tokenizer(model)
    if tokenizer is None:  # no tokenizer.json: only transformers can read it
        from batchgen.engine.loading import load_tokenizer as load_with_transformers

        tokenizer = load_with_transformers(model)
    return tokenizer
