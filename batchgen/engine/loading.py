"""Loading a model replica: device, dtype, tokenizer and weights through transformers'
``from_pretrained``, the path every hub model takes. Replicas only (torch); the driver checks
the model's files without torch (``modelcheck``).
"""

from __future__ import annotations

from typing import Any

import torch

from batchgen.errors import ModelError
from batchgen.spec import ModelSpec, ResourcesSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: ModelSpec) -> str:
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible to this replica")
    return spec.device


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ModelError(f"model.path {spec.path}: cannot load the tokenizer: {e}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(
                f"model.path {spec.path}: the tokenizer has neither a pad nor an EOS token"
            )
        tok.pad_token = tok.eos_token  # masked out anyway; any id would do
    return tok


def load_model(model: ModelSpec, resources: ResourcesSpec) -> tuple[Any, Any]:
    """(model in eval mode on its device, tokenizer padding on the left)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per replica per load is noise in job logs
    device = resolve_device(model)
    if device == "cpu":
        # One replica per cpus_per_replica cores: more threads only contend.
        torch.set_num_threads(max(1, int(resources.cpus_per_replica)))
    tokenizer = load_tokenizer(model)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            model.path,
            revision=model.revision,
            dtype=resolve_dtype(model, device),
            trust_remote_code=model.trust_remote_code,
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model.path {model.path}: cannot load the model: {e}") from None
    return lm.to(device).eval(), tokenizer
