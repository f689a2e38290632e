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


# Which spec section each part digests.
_SECTIONS = {"model": "model", "prompt": "input", "generation": "generation", "output": "output"}


def changes(changed_parts: list[str], spec: JobSpec, old_spec: dict[str, Any] | None,
            old_files: tuple[InputFile, ...], version: int,
            as_given: JobSpec | None = None) -> list[str]:
    """What changed, by key, for a refused resume: ``input.completion_column (None ->
    'answer')``, ``input files: a.parquet changed``. ``old_spec``: the spec stored in job.json
    (None, or one of another shape, names the part only). ``as_given``: the spec as the user
    spelled it, whose paths version-1 plans stored."""
    out = []
    for part in changed_parts:
        if part == "input":
            out.append(_file_changes(as_given if version == 1 and as_given else spec,
                                     old_files, version))
        elif part in _SECTIONS and isinstance(old_spec, dict) and isinstance(
                old_spec.get(_SECTIONS[part]), dict):
            name = _SECTIONS[part]
            new_doc = getattr(spec, name).model_dump(mode="json")
            keys = _changed_keys(name, old_spec[name], new_doc)
            if part == "generation" and old_spec.get("mode", "generate") != spec.mode:
                keys.insert(0, f"mode ({old_spec.get('mode', 'generate')!r} -> {spec.mode!r})")
            out += keys or [name]
        elif part != "engine":
            out.append(_SECTIONS.get(part, part))
    return out


def _changed_keys(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    later = LATER_KEYS.get(section, {})
    found = []
    for key in sorted(set(old) | set(new)):
        if key in NOT_OUTPUT_KEYS.get(section, ()):
            continue
        a, b = old.get(key, later.get(key)), new.get(key, later.get(key))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _changed_keys(f"{section}.{key}", a, b) or [f"{section}.{key}"]
        else:
            found.append(f"{section}.{key} ({_short(a)} -> {_short(b)})")
    return found


def _short(value: Any) -> str:
    text = repr(tuple(value) if isinstance(value, list) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def _file_changes(spec: JobSpec, old_files: tuple[InputFile, ...], version: int) -> str:
    old = {f.url: (f.size, f.etag) for f in old_files}
    now = {url: (size, etag) for url, size, etag in list_input_files(
        spec.input.path, input_options(spec), spec.input.format, by_content=version >= 2)}
    said = [f"{u} changed" for u in sorted(old.keys() & now.keys()) if old[u] != now[u]]
    said += [f"{u} added" for u in sorted(now.keys() - old.keys())]
    said += [f"{u} gone" for u in sorted(old.keys() - now.keys())]
    shown = ", ".join(said[:3]) + (f" and {len(said) - 3} more" if len(said) > 3 else "")
    return f"input files ({shown or 'listed differently'})"


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


