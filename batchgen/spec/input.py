"""``input``: where the rows are and how each becomes a prompt."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from batchgen.spec.base import _checked_path, _Section
from batchgen.spec.output import OUTPUT_COLUMNS


class Example(_Section):
    user: str = Field(description="An example prompt.")
    assistant: str = Field(description="The answer the model should imitate.")


class InputSpec(_Section):
    path: str = Field(
        description="Parquet or JSONL input: a file, a directory (all *.parquet / *.jsonl under "
        "it), a glob, or an s3:// URL of any of those. Relative local paths are relative to the "
        "working directory."
    )
    format: Literal["auto", "parquet", "jsonl"] = Field(
        default="auto",
        description="Input file format; 'auto' goes by the extension (.jsonl/.ndjson/.json are "
        "JSON Lines, one object per line; anything else is Parquet).",
    )
    prompt_column: str | None = Field(
        default=None,
        description="Column holding the prompt text. Defaults to 'prompt' when no template is given.",
    )
    template: str | None = Field(
        default=None,
        description="Jinja2 template rendered over the row's columns to make the prompt, e.g. "
        "'Summarize: {{ text }}'. Rendered in a sandbox; mutually exclusive with prompt_column.",
    )
    chat: bool = Field(
        default=False,
        description="Wrap the prompt as a user message and apply the model's chat template.",
    )
    system_prompt: str | None = Field(
        default=None, description="System message placed before the prompt when chat is true."
    )
    messages_column: str | None = Field(
        default=None,
        description="Column holding each row's conversation: a list of {role, content} messages "
        "(multi-turn, as chat datasets ship them), rendered with the model's chat template and "
        "answered as the next assistant turn. Implies chat: true; replaces prompt_column and "
        "template.",
    )
    tools: tuple[dict[str, Any], ...] = Field(
        default=(),
        description="Tools the model may call, as JSON tool schemas ({type: function, function: "
        "{name, description, parameters}}), passed to the chat template; the `tool_calls` output "
        "column holds the calls parsed from each generation. Needs chat.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the chat template, e.g. {enable_thinking: false}.",
    )
    completion_column: str | None = Field(
        default=None,
        description="With mode: score, the column holding the text to score after each prompt.",
    )
    id_column: str | None = Field(
        default=None,
        description="Column whose values identify rows (output row_id). Without it, row_id is the "
        "row's position in the planned input, which is stable because the plan is stored.",
    )
    columns: tuple[str, ...] = Field(
        default=(), description="Input columns copied into every output row."
    )
    examples: tuple[Example, ...] = Field(
        default=(),
        description="Few-shot examples placed before the prompt: as user/assistant turns with "
        "chat: true, else as text blocks separated by blank lines.",
    )
    long_documents: Literal["truncate", "chunk"] = Field(
        default="truncate",
        description="A prompt longer than the model's input budget is cut (model.truncation) or, "
        "with 'chunk', its chunk_column is split into token windows, each window summarized with "
        "the template, and the window summaries combined with reduce_template: one output per row.",
    )
    chunk_column: str | None = Field(
        default=None, description="With long_documents: chunk, the column holding the document."
    )
    chunk_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Tokens of the document per window; default: what fits in the input budget "
        "next to the template.",
    )
    chunk_overlap: int = Field(
        default=0, ge=0, description="Tokens shared by consecutive windows."
    )
    reduce_template: str | None = Field(
        default=None,
        description="Jinja2 template that combines the window summaries of one row, given as the "
        "list `summaries` besides the row's columns, e.g. 'Combine: {{ summaries | join(" ") }}'.",
    )

    _path_is_usable = field_validator("path")(_checked_path)

    @model_validator(mode="before")
    @classmethod
    def _messages_are_chat(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("messages_column") is not None:
            return {**data, "chat": True}
        return data

    @field_validator("tools")
    @classmethod
    def _tools_are_schemas(cls, tools: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        from batchgen.spec.tools import check_tools

        return check_tools(tools, "input.tools")

    @model_validator(mode="after")
    def _chunking(self) -> InputSpec:
        if self.long_documents == "chunk":
            if not self.chunk_column or not self.reduce_template or self.template is None:
                raise ValueError(
                    "long_documents: chunk needs template (the per-window prompt), chunk_column "
                    "(the document column the template reads) and reduce_template"
                )
            if self.chunk_tokens is not None and self.chunk_overlap >= self.chunk_tokens:
                raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        elif self.reduce_template is not None or self.chunk_column is not None:
            raise ValueError("reduce_template and chunk_column need long_documents: chunk")
        return self

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSpec:
        if self.template is not None and self.prompt_column is not None:
            raise ValueError("give either prompt_column or template, not both")
        if self.messages_column is not None and (self.template is not None
                                                 or self.prompt_column is not None):
            raise ValueError("messages_column replaces prompt_column and template; give one")
        if self.messages_column is not None and self.long_documents == "chunk":
            raise ValueError("long_documents: chunk needs a template, not messages_column")
        if self.tools and not self.chat:
            raise ValueError("tools need chat: true (or messages_column): the chat template "
                             "shows them to the model")
        if self.chat_template_kwargs and not self.chat:
            raise ValueError("chat_template_kwargs need chat: true (or messages_column)")
        taken = sorted(set(self.chat_template_kwargs) & {
            "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
            "add_generation_prompt", "continue_final_message", "return_dict", "padding",
            "truncation", "max_length", "return_tensors", "tokenizer_kwargs"})
        if taken:
            raise ValueError(f"chat_template_kwargs {taken}: batchgen sets these itself "
                             "(tools come from input.tools)")
        if self.system_prompt is not None and not self.chat:
            raise ValueError("system_prompt needs chat: true (it is a chat message)")
        clash = [c for c in self.columns if c in OUTPUT_COLUMNS and not self._is_plain_prompt(c)]
        if clash:
            raise ValueError(
                f"columns {clash} clash with output columns batchgen writes "
                f"({', '.join(OUTPUT_COLUMNS)}); rename them in the input"
            )
        return self

    def _is_plain_prompt(self, column: str) -> bool:
        # The output's `prompt` is the rendered prompt, equal to this column when it is used as is.
        return column == "prompt" == self.prompt_source and not self.chat

    @property
    def prompt_source(self) -> str:
        if self.messages_column is not None:
            return self.messages_column
        return self.prompt_column or ("prompt" if self.template is None else "")
