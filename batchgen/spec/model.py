"""``model``: which model, loaded how, with what prompt budget."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from batchgen.spec.base import _Section


class ModelSpec(_Section):
    path: str = Field(
        description="Hugging Face model id, a local directory saved with save_pretrained, or an "
        "s3:// URL of such a directory (downloaded once per node into model.cache_dir)."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where each node keeps models downloaded from s3://. Default: "
        "$BATCHGEN_MODEL_CACHE, else ~/.cache/batchgen/models.",
    )
    engine: Literal["transformers", "echo"] = Field(
        default="transformers",
        description="'echo' loads no model: every generation is the fixed text '[echo]' and "
        "model.path is ignored. For dry runs of a job's input, storage and cluster, and for "
        "measuring the driver.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weights dtype. 'auto' takes bfloat16 on CUDA and float32 on CPU, where half "
        "precision is slow.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' uses CUDA when the replica has a GPU."
    )
    max_input_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Longest prompt in tokens; longer prompts are truncated or fail per row. "
        "Defaults to the model's context length minus generation.max_new_tokens.",
    )
    truncation: Literal["left", "right", "error"] = Field(
        default="left",
        description="What to do with a prompt longer than max_input_tokens: drop tokens from the "
        "left (keeps the end, where instructions usually are), from the right, or fail that row.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repository to run."
    )
