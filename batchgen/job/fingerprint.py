"""The job fingerprint: one digest per thing that changes output rows.

A plan stores the fingerprint of the job it was made for; a resume computes it again from the
spec and the input as they stand (one listing, no re-plan) and refuses a job that changed unless
forced, naming what changed. Version 3 digests the input files, each output-changing section of
the spec (less the keys that cannot change an output row) and the engine's version; plans of
versions 1 and 2 still resume.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from batchgen.engine.versions import ENGINE_VERSION
from batchgen.io.inputs import InputFile, list_input_files
from batchgen.io.storage import input_options
from batchgen.shard import prompts
from batchgen.spec import JobSpec

# 2: whole spec sections digested (minus keys that cannot change outputs), local inputs
# identified by content, local paths resolved. Plans without the field were written with 1.
# 3: the engine's version (``versions.ENGINE_VERSION``) is a part; plans of 1 and 2 were made by
# engine version 1.
FINGERPRINT_VERSION = 3

# Keys of output-changing sections that do not change any output row: where the model is cached,
# where outputs go, how files are compressed. Everything else in input, model, generation and
# output is digested, so a new key is covered by default.
NOT_OUTPUT_KEYS = {
    "input": {"path"},  # the files it names are digested one by one instead
    "model": {"cache_dir"},
    "output": {"path", "compression"},
}
# Keys added after fingerprint version 3, with the value that leaves outputs as they were: left
# out of the digest at that value, so a job that does not use them keeps its fingerprint (and
# resumes); digested like any other key once set.
LATER_KEYS = {
    "input": {"messages_column": None, "tools": [], "chat_template_kwargs": {},
              "completion_column": None},
    "generation": {"structured": None, "logprobs": None, "reasoning_end": None},
}


def current_fingerprint(spec: JobSpec, version: int = FINGERPRINT_VERSION,
                        as_given: JobSpec | None = None) -> tuple[str, dict[str, str]]:
    """The job's fingerprint as its input stands now, from one listing (and, for local
    Parquet files, one footer read each): what a resume compares with the stored plan,
    without re-planning. ``version`` 1 reproduces what earlier batchgen versions stored, from
    the spec as the user spelled it (``as_given``), so their jobs still resume."""
    prompts.needed_columns(spec.input)  # the template is still checked before any work
    if version == 1:
        legacy = as_given or spec
        listed = list_input_files(legacy.input.path, input_options(legacy), legacy.input.format,
                                  by_content=False)
        parts = _legacy_parts(legacy, tuple(InputFile(u, size, etag, 0) for u, size, etag in listed))
    else:
        listed = list_input_files(spec.input.path, input_options(spec), spec.input.format)
        parts = fingerprint_parts(spec, tuple(InputFile(u, size, etag, 0) for u, size, etag in listed))
        if version == 2:  # before the engine's version was a part
            del parts["engine"]
    return digest(parts), parts


def fingerprint_parts(spec: JobSpec, files: tuple[InputFile, ...]) -> dict[str, str]:
    """One digest per thing that changes outputs, so a mismatch can say which changed."""
    def section(name: str) -> dict[str, Any]:
        doc = getattr(spec, name).model_dump(mode="json")
        later = LATER_KEYS.get(name, {})
        return {k: v for k, v in doc.items() if k not in NOT_OUTPUT_KEYS.get(name, ())
                and not (k in later and v == later[k])}

    return {
        "input": digest([(f.url, f.size, f.etag) for f in files]),
        "model": digest(section("model")),
        "prompt": digest(section("input")),
        "generation": digest(section("generation") | (
            {"mode": spec.mode} if spec.mode != "generate" else {})),
        "output": digest(section("output")),
        "engine": engine_part(spec),
    }


def engine_part(spec: JobSpec) -> str:
    """The engine's version, and with generation.structured the grammar engine's: another
    llguidance may mask differently, so constrained text from two of them is never mixed."""
    if spec.generation.structured is None:
        return str(ENGINE_VERSION)
    from importlib.metadata import version

    return f"{ENGINE_VERSION}+llguidance-{version('llguidance')}"


def _legacy_parts(spec: JobSpec, files: tuple[InputFile, ...]) -> dict[str, str]:
    """Fingerprint version 1, as batchgen wrote it before version 2 (kept to resume old jobs)."""
    m, g, i = spec.model, spec.generation, spec.input
    return {
        "input": digest([(f.url, f.size, f.etag) for f in files]),
        "model": digest([m.path, m.revision, m.dtype, m.max_input_tokens, m.truncation]
                         + ([m.engine] if m.engine != "transformers" else [])),
        "prompt": digest(
            [i.prompt_column, i.template, i.chat, i.system_prompt, i.id_column, list(i.columns)]
        ),
        "generation": digest(g.model_dump(mode="json")),
    }


def digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


