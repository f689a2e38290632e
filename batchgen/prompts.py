"""Turning an input row into prompt text.

A prompt comes from one column, or from a Jinja2 template over the row's columns rendered in
Jinja2's immutable sandbox (no access to Python internals, no imports, no files). The chat
template, when asked for, is applied by the engine, which owns the tokenizer; this module only
builds the messages.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from batchgen.errors import SpecError
from batchgen.spec import InputSpec


class RowError(ValueError):
    """This row cannot be turned into a prompt; it becomes an error row, the shard goes on."""


@lru_cache(maxsize=1)
def _env() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@lru_cache(maxsize=64)
def _compile(template: str, key: str = "input.template"):
    check_template(template, key)
    return _env().from_string(template)


def _parse(template: str, key: str):
    try:
        return _env().parse(template)
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


def render(spec: InputSpec, row: dict[str, Any], template: str | None = None,
           key: str = "input.template") -> str:
    """The prompt text for one row (before any chat template); raises RowError. ``template``
    replaces the spec's (the reduce step of chunked documents)."""
    template = template or spec.template
    if template is not None:
        try:
            text = _compile(template, key).render(**row)
        except SecurityError as e:
            raise RowError(f"template refused by the sandbox: {e}") from None
        except UndefinedError as e:
            raise RowError(f"template error: {e}") from None
        except Exception as e:  # noqa: BLE001 - any template failure is this row's failure
            raise RowError(f"template error: {type(e).__name__}: {e}") from None
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
