"""Turning an input row into prompt text.

A prompt comes from one column, or from a Jinja2 template over the row's columns rendered in
Jinja2's immutable sandbox (no access to Python internals, no imports, no files) under a time and
size budget per row (``batchgen.sandbox``). Few-shot examples and the model's chat template go
around it (``wrap_prompt``). No torch here: ``batchgen plan`` renders prompts for its estimate
without loading a model.

Contract: ``render`` returns the text or raises ``RowError``, whose message becomes that row's
``error``; the shard goes on. ``check_template`` and ``check_column_types`` refuse at plan time
what would fail on every row.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow as pa
from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError

from batchgen import sandbox
from batchgen.errors import SpecError
from batchgen.spec import InputSpec, JobSpec


class RowError(ValueError):
    """This row cannot be turned into a prompt; it becomes an error row, the shard goes on."""


# -- templates ------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _compile(template: str, key: str = "input.template"):
    check_template(template, key)
    return sandbox.compile_template(_parse(template, key))


def _parse(template: str, key: str):
    try:
        return sandbox.environment().parse(template)
    except TemplateSyntaxError as e:
        raise SpecError(f"{key}: invalid Jinja2 template (line {e.lineno}): {e.message}") from None


def check_template(template: str, key: str = "input.template") -> None:
    """Refuse, before any work, what the sandbox would refuse on every row: private attributes
    (the way to Python internals), and include/import/extends (the way to files)."""
    ast = _parse(template, key)
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise SpecError(
            f"{key}: refused by the sandbox: templates may not {type(node).__name__.lower()} "
            f"other templates or files (line {node.lineno})"
        )
    for node in ast.find_all(nodes.Filter):
        arg = node.args[0] if node.name == "attr" and node.args else None
        if isinstance(arg, nodes.Const) and str(arg.value).startswith("_"):
            raise SpecError(f"{key}: refused by the sandbox: access to {arg.value!r} "
                            f"(line {node.lineno}); templates may only read the row's columns")
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            raise SpecError(
                f"{key}: refused by the sandbox: access to {name!r} (line {node.lineno}); "
                "templates may only read the row's columns"
            )


def template_columns(template: str, key: str = "input.template") -> set[str]:
    """The row columns a template reads."""
    check_template(template, key)
    return set(meta.find_undeclared_variables(_parse(template, key)))


def needed_columns(spec: InputSpec) -> list[str]:
    """Input columns a shard must read: prompt source, id and kept columns, in a stable order."""
    cols: list[str] = []
    if spec.template is not None:
        cols += sorted(template_columns(spec.template))
        if spec.reduce_template is not None:
            reduce_cols = template_columns(spec.reduce_template, "input.reduce_template")
            cols += sorted(reduce_cols - {"summaries"})
        if spec.chunk_column:
            cols.append(spec.chunk_column)
    else:
        cols.append(spec.prompt_source)
    if spec.id_column:
        cols.append(spec.id_column)
    cols += list(spec.columns)
    return list(dict.fromkeys(cols))


def check_column_types(spec: InputSpec, schema: pa.Schema, where: str) -> None:
    """Refuse, at plan time, columns whose type makes every row an error (or no id at all): a
    prompt or document column that does not hold text, an id column of nested values. Null and
    empty values stay per-row errors. Columns missing from ``schema`` are not checked here."""
    text_columns = [("input.prompt_column", spec.prompt_source)] if spec.template is None else []
    if spec.chunk_column:
        text_columns.append(("input.chunk_column", spec.chunk_column))
    for key, column in text_columns:
        if column in schema.names and not _is_text(schema.field(column).type):
            kind = schema.field(column).type
            fix = (f"or render it with input.template, e.g. '{{{{ {column} }}}}'"
                   if key == "input.prompt_column" else "as text")
            raise SpecError(
                f"{where}: {key} {column!r} is of type {kind}, not text, so every row would be an "
                f"error row; cast the column to string in the input {fix}"
            )
    column = spec.id_column
    if column and column in schema.names and pa.types.is_nested(schema.field(column).type):
        raise SpecError(
            f"{where}: input.id_column {column!r} is of type {schema.field(column).type}; ids "
            "must be single values (string or integer), one per row"
        )


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind) or pa.types.is_null(kind))


def render(spec: InputSpec, row: dict[str, Any], template: str | None = None,
           key: str = "input.template") -> str:
    """The prompt text for one row (before any chat template); raises RowError. ``template``
    replaces the spec's (the reduce step of chunked documents)."""
    template = template or spec.template
    if template is not None:
        text = _render_template(_compile(template, key), row)
    else:
        text = row.get(spec.prompt_source)
        if text is None:
            raise RowError(f"prompt column {spec.prompt_source!r} is null")
        if not isinstance(text, str):
            raise RowError(
                f"prompt column {spec.prompt_source!r} holds {type(text).__name__}, not text"
            )
    if not text.strip():
        raise RowError("prompt is empty")
    return text


def _render_template(compiled: Any, row: dict[str, Any]) -> str:
    try:
        return sandbox.render(compiled, row)
    except sandbox.RenderLimit as e:
        raise RowError(str(e)) from None
    except SecurityError as e:
        raise RowError(f"template refused by the sandbox: {e}") from None
    except UndefinedError as e:
        raise RowError(f"template error: {e}") from None
    except Exception as e:  # noqa: BLE001 - any template failure is this row's failure
        raise RowError(f"template error: {type(e).__name__}: {e}") from None


def render_prompts(
    spec: JobSpec, rows: list[dict[str, Any]], bad: dict[int, str], tokenizer: Any
) -> tuple[list[str | None], list[str | None]]:
    """(prompt text or None, error or None) per row, after the chat template if asked for;
    ``bad`` holds rows already known to fail (their error is kept)."""
    texts: list[str | None] = [None] * len(rows)
    errors: list[str | None] = [bad.get(i) for i in range(len(rows))]
    for i, row in enumerate(rows):
        if errors[i] is not None:
            continue
        try:
            text = render(spec.input, row)
        except RowError as e:
            errors[i] = str(e)
            continue
        texts[i] = wrap_prompt(spec, text, tokenizer)
    return texts, errors


def wrap_prompt(spec: JobSpec, text: str, tokenizer: Any) -> str:
    """Few-shot examples and, with chat: true, the model's chat template around a prompt."""
    if spec.input.chat:
        return tokenizer.apply_chat_template(
            chat_messages(spec.input, text), tokenize=False, add_generation_prompt=True
        )
    return with_examples(spec.input, text) if spec.input.examples else text


def prefix_probes(spec: JobSpec, tokenizer: Any) -> tuple[str, str]:
    """Two full prompts of this job rendered from rows that differ in every column: the text
    every prompt of the job starts with (system prompt, few-shot examples, the template's
    leading text) is their common start. Depends on the spec alone, never on the data."""
    columns = needed_columns(spec.input)
    texts = []
    for mark in ("Qq", "Zz"):  # their first bytes differ, so no token spans both
        try:
            text = render(spec.input, {c: mark for c in columns})
        except RowError:  # a template that cannot take a string: no template text shared
            text = mark
        texts.append(wrap_prompt(spec, text, tokenizer))
    return texts[0], texts[1]


def chat_messages(spec: InputSpec, prompt: str) -> list[dict[str, str]]:
    messages = []
    if spec.system_prompt:
        messages.append({"role": "system", "content": spec.system_prompt})
    for ex in spec.examples:
        messages += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant}]
    messages.append({"role": "user", "content": prompt})
    return messages


def with_examples(spec: InputSpec, prompt: str) -> str:
    """Few-shot examples as plain text before the prompt (when chat is off)."""
    blocks = [f"{ex.user}{ex.assistant}" for ex in spec.examples]
    return "\n\n".join([*blocks, prompt])
