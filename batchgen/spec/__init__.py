"""The job spec: one YAML file, validated by frozen pydantic models.

Contract: every key has a default where one makes sense; unknown keys are an error; a spec that
loads is one that can run (cross-field rules, constraints and tool schemas are checked here, so
a bad spec fails before any work starts); errors name the file and the dotted key
(``job.yaml: generation.top_p: Input should be less than or equal to 1, got 1.5``). Imports
nothing of batchgen but ``errors``; no torch, no storage.
"""

from batchgen.spec.generation import MAX_LOGPROBS, GenerationSpec, StructuredSpec
from batchgen.spec.input import Example, InputSpec
from batchgen.spec.job import JobSpec
from batchgen.spec.load import apply_overrides, load_spec, parse_spec  # noqa: E402 - needs JobSpec
from batchgen.spec.model import ModelSpec
from batchgen.spec.output import OUTPUT_COLUMNS, OutputSpec
from batchgen.spec.resources import ResourcesSpec, StorageSpec

__all__ = [
    "MAX_LOGPROBS", "OUTPUT_COLUMNS", "Example", "GenerationSpec", "InputSpec", "JobSpec",
    "ModelSpec", "OutputSpec", "ResourcesSpec", "StorageSpec", "StructuredSpec",
    "apply_overrides", "load_spec", "parse_spec",
]
