"""Turning an input row into prompt text.

A prompt comes from one column, or from a Jinja2 template over the row's columns rendered in
Jinja2's immutable sandbox (no access to Python internals, no imports, no files). The chat
template, when asked for, is applied by the engine, which owns the tokenizer; this module only
builds the messages.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
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
def _compile(template: str):
    try:
        return _env().from_string(template)
    except TemplateSyntaxError as e:
        raise SpecError(f"input.template: invalid Jinja2 template (line {e.lineno}): {e.message}")


def template_columns(template: str) -> set[str]:
    """The row columns a template reads."""
    try:
        ast = _env().parse(template)
    except TemplateSyntaxError as e:
        raise SpecError(
            f"input.template: invalid Jinja2 template (line {e.lineno}): {e.message}"
        ) from None
    return set(meta.find_undeclared_variables(ast))


def needed_columns(spec: InputSpec) -> list[str]:
    """Input columns a shard must read: prompt source, id and kept columns, in a stable order."""
    cols: list[str] = []
    if spec.template is not None:
        cols += sorted(template_columns(spec.template))
    else:
        cols.append(spec.prompt_source)
    if spec.id_column:
        cols.append(spec.id_column)
    cols += list(spec.columns)
    return list(dict.fromkeys(cols))


def render(spec: InputSpec, row: dict[str, Any]) -> str:
    """The prompt text for one row (before any chat template); raises RowError."""
    if spec.template is not None:
        try:
            text = _compile(spec.template).render(**row)
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
    messages.append({"role": "user", "content": prompt})
    return messages
