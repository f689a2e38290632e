"""Turning an input row into prompt text.

A prompt comes from one column, from a Jinja2 template over the row's columns rendered in
Jinja2's immutable sandbox (no access to Python internals, no imports, no files) under a time and
size budget per row (``batchgen.shard.sandbox``), or, with ``input.messages_column``, from the row's
own conversation (a list of {role, content} messages). Few-shot examples, the system prompt,
the tools and the model's chat template go around it (``wrap_prompt``). No torch here:
``batchgen plan`` renders prompts for its estimate without loading a model.

Contract: ``row_prompt`` returns the text (``render``) or the checked conversation
(``conversation``), or raises ``RowError``, whose message becomes that row's ``error``; the
shard goes on. ``wrap_prompt`` raises ``RowError`` too when the chat template fails on a row.
``check_template`` and ``check_column_types`` refuse at plan time what would fail on every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import pyarrow as pa
from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError

from batchgen.errors import SpecError
from batchgen.shard import sandbox
from batchgen.spec import InputSpec, JobSpec


class RowError(ValueError):
    """This row cannot be turned into a prompt; it becomes an error row, the shard goes on."""


ROLES = ("system", "user", "assistant", "tool")
Prompt = str | list[dict[str, Any]]  # a prompt's text, or a row's conversation


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
    if spec.completion_column:
        cols.append(spec.completion_column)
    if spec.id_column:
        cols.append(spec.id_column)
    cols += list(spec.columns)
    return list(dict.fromkeys(cols))


def job_columns(spec: JobSpec) -> list[str]:
    """``needed_columns`` plus the column of per-row JSON Schemas (generation.structured)."""
    cols = needed_columns(spec.input)
    structured = spec.generation.structured
    if structured is not None and structured.json_schema_column:
        cols.append(structured.json_schema_column)
    return list(dict.fromkeys(cols))


def check_column_types(spec: InputSpec, schema: pa.Schema, where: str) -> None:
    """Refuse, at plan time, columns whose type makes every row an error (or no id at all): a
    prompt or document column that does not hold text, a messages column that does not hold
    lists of {role, content} messages, an id column of nested values. Null and empty values
    stay per-row errors. Columns missing from ``schema`` are not checked here."""
    text_columns = ([("input.prompt_column", spec.prompt_source)]
                    if spec.template is None and spec.messages_column is None else [])
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
    column = spec.messages_column
    if column and column in schema.names:
        problem = _messages_type_problem(schema.field(column).type)
        if problem:
            raise SpecError(
                f"{where}: input.messages_column {column!r} is of type "
                f"{schema.field(column).type}, {problem}, so every row would be an error row; "
                "it must hold a list of {role, content} messages with text content (in Parquet "
                "list<struct<role: string, content: string>>, in JSON Lines a list of objects)"
            )
    column = spec.id_column
    if column and column in schema.names and pa.types.is_nested(schema.field(column).type):
        raise SpecError(
            f"{where}: input.id_column {column!r} is of type {schema.field(column).type}; ids "
            "must be single values (string or integer), one per row"
        )


def _messages_type_problem(kind: pa.DataType) -> str | None:
    """Why a column of this type cannot hold conversations, or None when it can."""
    if pa.types.is_null(kind):
        return None  # all null: per-row errors
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind)
            or pa.types.is_fixed_size_list(kind)):
        return "not a list"
    item = kind.value_type
    if pa.types.is_map(item):
        return None if _is_text(item.key_type) else "whose message keys are not text"
    if not pa.types.is_struct(item):
        return f"a list of {item}, not of messages"
    fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    missing = [k for k in ("role", "content") if k not in fields]
    if missing:
        return f"whose messages have no {' or '.join(missing)} field"
    for k in ("role", "content"):
        if not _is_text(fields[k]):
            return f"whose message {k} is of type {fields[k]}, not text"
    return None


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind) or pa.types.is_null(kind))


def row_prompt(spec: InputSpec, row: dict[str, Any]) -> Prompt:
    """What ``wrap_prompt`` takes for one row: with ``messages_column`` the row's checked
    conversation (``conversation``), else its prompt text (``render``); raises RowError."""
    if spec.messages_column is not None:
        return conversation(spec, row)
    return render(spec, row)


def render(spec: InputSpec, row: dict[str, Any], template: str | None = None,
           key: str = "input.template") -> str:
    """The prompt text for one row (before any chat template); raises RowError. ``template``
    replaces the spec's (the reduce step of chunked documents). Not for ``messages_column``
    jobs, whose rows are conversations (``row_prompt``)."""
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


def conversation(spec: InputSpec, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's ``messages_column`` as chat messages, checked; raises RowError naming the
    column and the message (counted from 1).

    Each message is a mapping (a struct, a JSON object, or the key/value pairs of a Parquet map)
    with a ``role`` in ``ROLES`` and text ``content``; an assistant message with ``tool_calls``
    may have null content. Other keys (``tool_calls``, ``name``, ``tool_call_id`` ...) go to the
    chat template as they are, except null ones: Parquet and JSON Lines readers give every
    message every key any message of the file has, null where it had none. The conversation
    must end with a user or tool message, the one the model answers."""
    column = spec.messages_column
    where = f"messages column {column!r}"
    value = row.get(column)
    if value is None:
        raise RowError(f"{where} is null")
    if not isinstance(value, (list, tuple)):
        raise RowError(f"{where} holds {type(value).__name__}, not a list of messages")
    if not value:
        raise RowError(f"{where} is an empty list; nothing to answer")
    messages = []
    for n, raw in enumerate(value, start=1):
        message = _as_mapping(raw)
        if message is None:
            raise RowError(f"{where}: message {n} is {type(raw).__name__}, not a mapping "
                           "with role and content")
        role = message.get("role")
        if role is None:
            raise RowError(f"{where}: message {n} has no role")
        if role not in ROLES:
            raise RowError(f"{where}: message {n} has role {role!r}; roles are "
                           f"{', '.join(ROLES)}")
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise RowError(f"{where}: message {n} ({role}) has no content")
        if content is not None and not isinstance(content, str):
            raise RowError(f"{where}: message {n} ({role}) has content of type "
                           f"{type(content).__name__}, not text")
        messages.append({k: v for k, v in message.items()
                         if v is not None or k == "content"})
    last = messages[-1]["role"]
    if last not in ("user", "tool"):
        article = "an" if last == "assistant" else "a"
        raise RowError(f"{where} ends with {article} {last} message; nothing to answer (the "
                       "last message must be a user or tool message)")
    return messages


def _as_mapping(raw: Any) -> dict[str, Any] | None:
    if isinstance(raw, Mapping):
        return {str(k): v for k, v in raw.items()}
    # A Parquet map<string, string> comes out of pyarrow as a list of (key, value) tuples.
    if isinstance(raw, list) and all(isinstance(p, tuple) and len(p) == 2 for p in raw):
        return {str(k): v for k, v in raw}
    return None


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
            texts[i] = wrap_prompt(spec, row_prompt(spec.input, row), tokenizer)
        except RowError as e:
            errors[i] = str(e)
    return texts, errors


def wrap_prompt(spec: JobSpec, prompt: Prompt, tokenizer: Any) -> str:
    """Few-shot examples and, with chat: true, the system prompt, the tools and the model's chat
    template around a prompt's text or a row's conversation; raises RowError when the chat
    template fails on it (a template may raise on roles or order it does not accept).

    Without tools and template kwargs the call is the one batchgen always made, so existing
    chat jobs keep their prompts byte for byte."""
    inp = spec.input
    if not inp.chat:
        return with_examples(inp, prompt) if inp.examples else prompt
    extra: dict[str, Any] = dict(inp.chat_template_kwargs)
    if inp.tools:
        extra["tools"] = list(inp.tools)
    try:
        return tokenizer.apply_chat_template(
            chat_messages(inp, prompt), tokenize=False, add_generation_prompt=True, **extra
        )
    except Exception as e:  # noqa: BLE001 - a template failing on this row is this row's failure
        raise RowError(f"chat template error: {_template_message(e)}") from None


def _template_message(e: Exception) -> str:
    from jinja2 import TemplateError

    from batchgen.errors import ModelError

    text = str(e).strip()
    if isinstance(e, ModelError):  # raise_exception in the plan's torch-free tokenizer
        return text.removeprefix("chat template: ")
    if isinstance(e, TemplateError) and text:  # raise_exception in transformers' templates
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def prefix_probes(spec: JobSpec, tokenizer: Any) -> tuple[str, str]:
    """Two full prompts of this job rendered from rows that differ in every column: the text
    every prompt of the job starts with (system prompt, few-shot examples, the template's
    leading text) is their common start. Depends on the spec alone, never on the data."""
    columns = needed_columns(spec.input)
    texts = []
    for mark in ("Qq", "Zz"):  # their first bytes differ, so no token spans both
        prompt: Prompt
        if spec.input.messages_column is not None:
            prompt = [{"role": "user", "content": mark}]
        else:
            try:
                prompt = render(spec.input, {c: mark for c in columns})
            except RowError:  # a template that cannot take a string: no template text shared
                prompt = mark
        try:
            texts.append(wrap_prompt(spec, prompt, tokenizer))
        except RowError:  # a chat template that refuses even this: nothing shared worth knowing
            return "Qq", "Zz"
    return texts[0], texts[1]


def chat_messages(spec: InputSpec, prompt: Prompt) -> list[dict[str, Any]]:
    """The messages the chat template gets: the system prompt, the few-shot examples, then the
    prompt as a user message or the row's conversation. A conversation that opens with its own
    system message keeps it, in place of ``input.system_prompt``, and the examples follow it."""
    if isinstance(prompt, str):
        system, turns = None, [{"role": "user", "content": prompt}]
    elif prompt and prompt[0].get("role") == "system":
        system, turns = prompt[0], prompt[1:]
    else:
        system, turns = None, list(prompt)
    if system is None and spec.system_prompt:
        system = {"role": "system", "content": spec.system_prompt}
    messages = [system] if system is not None else []
    for ex in spec.examples:
        messages += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.assistant}]
    return messages + turns


def with_examples(spec: InputSpec, prompt: str) -> str:
    """Few-shot examples as plain text before the prompt (when chat is off)."""
    blocks = [f"{ex.user}{ex.assistant}" for ex in spec.examples]
    return "\n\n".join([*blocks, prompt])
