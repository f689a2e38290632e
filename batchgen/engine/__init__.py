"""The engine: token ids in, token ids out. No Ray, no storage.

Contract: ``Engine.generate(requests)`` returns one ``Completion`` per ``Request``, in order; a
request's tokens depend only on its prompt, its seed and its constraint, never on which other
requests share its batch, shard, replica or attempt (bitwise on CPU). ``Engine.score`` gives
teacher-forced log-probabilities. ``completions`` holds this contract as torch-free data, and
``versions.ENGINE_VERSION`` names the token streams the engine produces.

The public names below are imported lazily: ``import batchgen.engine`` (or its torch-free
``completions`` and ``versions``) loads no torch; ``batchgen.engine.Engine`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Engine": "engine", "load_engine": "engine",
    "EchoEngine": "echo",
    "Request": "completions", "Completion": "completions", "ScoreRequest": "completions",
    "Score": "completions", "TokenLogprob": "completions", "EngineStats": "completions",
    "PromptTooLong": "completions",
    "ENGINE_VERSION": "versions",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
