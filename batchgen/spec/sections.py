"""The job spec: one YAML file, validated by frozen pydantic models.

Every key has a default where one makes sense and unknown keys are an error. Errors name the file
and the dotted key: ``job.yaml: generation.top_p: Input should be less than or equal to 1, got 1.5``.
``--set section.key=value`` overrides are applied to the raw YAML before validation, so they get
the same checks and messages. Loading (YAML, overrides, messages) is in ``specfile.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Columns every output row has, and those some jobs add (see the README's output layout);
# input.columns may not reuse the first group, nor those of the second that its job writes
# (``JobSpec.optional_columns``).
OUTPUT_COLUMNS = (
    "row_id", "sample_index", "prompt", "generation", "finish_reason",
    "prompt_tokens", "generated_tokens", "error", "seed",
    "parsed", "parse_error", "document_tokens", "chunks",
)
MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's top_logprobs limit too)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checked_path(path: str) -> str:
    # An empty output.path used to become "/" (a whole job written into the filesystem root),
    # and an empty input.path meant "every file under the current directory".
    if not path.strip():
        raise ValueError("must not be empty (is a shell variable unset?)")
    scheme, sep, rest = path.partition("://")
    if sep and not rest.strip("/"):
        raise ValueError(f"names no {'bucket' if scheme in ('s3', 's3a') else 'directory'}")
    if not path.strip("/"):
        raise ValueError("must not be the filesystem root")
    return path


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


class ModelSpec(_Section):
    path: str = Field(
        description="Hugging Face model id, a local directory saved with save_pretrained, or an "
        "s3:// URL of such a directory (downloaded once per node into model.cache_dir)."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where each node keeps models downloaded from s3://. Default: "
        "$BATCHGEN_MODEL_CACHE, else ~/.cache/batchgen/models.",
    )
    engine: Literal["transformers", "echo"] = Field(
        default="transformers",
        description="'echo' loads no model: every generation is the fixed text '[echo]' and "
        "model.path is ignored. For dry runs of a job's input, storage and cluster, and for "
        "measuring the driver.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weights dtype. 'auto' takes bfloat16 on CUDA and float32 on CPU, where half "
        "precision is slow.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' uses CUDA when the replica has a GPU."
    )
    max_input_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Longest prompt in tokens; longer prompts are truncated or fail per row. "
        "Defaults to the model's context length minus generation.max_new_tokens.",
    )
    truncation: Literal["left", "right", "error"] = Field(
        default="left",
        description="What to do with a prompt longer than max_input_tokens: drop tokens from the "
        "left (keeps the end, where instructions usually are), from the right, or fail that row.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repository to run."
    )


class StructuredSpec(_Section):
    """Constrained decoding: exactly one key. Tokens the constraint does not allow are masked
    before sampling, and the end-of-sequence token only where the constraint may end."""

    json_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema every generation satisfies."
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)

    json_object: bool = Field(default=False, alias="json",
                              description="true: every generation is a JSON object.")
    regex: str | None = Field(default=None, description="A regular expression every generation "
                              "matches whole.")
    choice: tuple[str, ...] | None = Field(
        default=None, description="Every generation is exactly one of these strings."
    )
    grammar: str | None = Field(
        default=None,
        description="A Lark grammar (llguidance's dialect: EBNF-like rules, /regex/ terminals, "
        "%json {schema} embeds) whose start rule every generation matches.",
    )
    json_schema_column: str | None = Field(
        default=None,
        description="Column holding each row's own JSON Schema (JSON text or a struct); a row "
        "whose schema is invalid becomes an error row.",
    )
    tool_call: bool = Field(
        default=False,
        description="true: every generation is one call of one of input.tools, its arguments "
        "valid against that tool's parameters schema.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredSpec:
        given = [k for k in ("json_schema", "regex", "choice", "grammar", "json_schema_column")
                 if getattr(self, k) is not None] + [k for k in ("json_object", "tool_call")
                                                     if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of json_schema, json, regex, choice, grammar, "
                f"json_schema_column, tool_call (got {', '.join(given).replace('json_object', 'json') or 'none'})")
        if self.choice is not None and (not self.choice or any(c == "" for c in self.choice)):
            raise ValueError("choice needs at least one non-empty string")
        from batchgen.engine.structured import check_spec

        check_spec(self)
        return self


class GenerationSpec(_Section):
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0 means greedy decoding."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k likeliest tokens; 0 = off.")
    n: int = Field(default=1, ge=1, le=1024, description="Samples per input row.")
    seed: int = Field(
        default=0,
        ge=0,
        description="Job seed. Each row's sampling seed derives from (seed, row_id, sample_index), "
        "so reruns and retries give the same text whatever the batching.",
    )
    stop: tuple[str, ...] = Field(
        default=(), description="Generation is cut at the first of these strings."
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, description="CTRL-style penalty on tokens already seen; 1 = off."
    )
    ignore_eos: bool = Field(
        default=False,
        description="Generate exactly max_new_tokens, past the model's end-of-sequence token "
        "(stop strings still apply). For benchmarks and load tests.",
    )
    dedupe: bool = Field(
        default=False,
        description="Drop a sample whose text repeats an earlier sample of the same row exactly "
        "(counted as duplicates_removed in the done markers and manifest).",
    )

    structured: StructuredSpec | None = Field(
        default=None,
        description="Constrained decoding (see StructuredSpec): the output is guaranteed to have "
        "the given form, except when max_new_tokens cuts it (finish_reason: length, and a "
        "parse_error that says truncated).",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Per generated token, its id, text and log-probability plus the K likeliest "
        "alternatives (0: the chosen token only), and each row's cumulative_logprob. From the "
        "model's distribution before temperature, top-k/top-p, repetition penalty and any "
        "constraint. With mode: score, the per-token log-probabilities of the completion.",
    )
    reasoning_end: str | None = Field(
        default=None,
        description="The marker that ends a reasoning model's thinking, e.g. '</think>': the text "
        "before it goes to the `reasoning` column, the rest to `generation`, and a constraint "
        "applies only after it.",
    )

    @model_validator(mode="after")
    def _sampling_for_many(self) -> GenerationSpec:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                "n > 1 needs temperature > 0: greedy decoding would give n identical samples"
            )
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.structured is not None and self.ignore_eos:
            raise ValueError("structured needs ignore_eos: false: a finished constraint allows "
                             "only the end-of-sequence token")
        if self.structured is not None and self.stop:
            raise ValueError("structured takes no stop strings: a stop string would cut the "
                             "output its constraint shapes (the constraint ends it already)")
        if self.reasoning_end is not None and not self.reasoning_end.strip():
            raise ValueError("reasoning_end must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class OutputSpec(_Section):
    path: str = Field(description="Output directory, local or s3://; see the README's layout.")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        default="zstd", description="Parquet compression of the data files."
    )
    parse: Literal["none", "json"] = Field(
        default="none",
        description="'json': parse the first JSON object in each generation into the `parsed` "
        "column (canonical JSON text); rows that do not parse keep a `parse_error`, and are "
        "counted, not dropped.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON Schema that parsed objects must satisfy (needs parse: json); a "
        "violation is a parse_error.",
    )

    _path_is_usable = field_validator("path")(_checked_path)

    @model_validator(mode="after")
    def _schema_is_valid(self) -> OutputSpec:
        if self.json_schema is not None:
            if self.parse != "json":
                raise ValueError("json_schema needs parse: json")
            from batchgen.shard.postprocess import schema_error

            problem = schema_error(self.json_schema)
            if problem:
                raise ValueError(f"json_schema is not a valid JSON Schema: {problem}")
        return self


class ResourcesSpec(_Section):
    replicas: int = Field(default=1, ge=1, description="Model replicas (Ray actors).")
    gpus_per_replica: float = Field(
        default=0.0, ge=0.0, description="GPUs each replica reserves; 0 runs on CPU."
    )
    cpus_per_replica: float = Field(
        default=1.0,
        gt=0.0,
        description="CPUs each replica reserves; on CPU it is also the replica's torch thread "
        "count, so replicas do not fight over cores.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="Sequences decoded together at most. Larger batches give more throughput "
        "until memory or compute saturates.",
    )
    max_batch_tokens: int = Field(
        default=32768,
        ge=1,
        description="Token budget of a batch: rows x (longest prompt + max_new_tokens). Bounds "
        "the KV cache, so long prompts get smaller batches instead of running out of memory.",
    )
    shard_rows: int = Field(
        default=1000,
        ge=1,
        description="Input rows per shard, the unit of scheduling, commit and retry. Small shards "
        "lose less work on a failure; large ones cost fewer commits.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Attempts per shard before it is recorded as failed."
    )


class StorageSpec(_Section):
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, SeaweedFS, a test server). Credentials come "
        "from the environment (AWS_ACCESS_KEY_ID, ...), never from the spec.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec/s3fs options, e.g. {anon: true}. Credentials are refused here.",
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        # One rule for run, submit and resume: job.json and a submitted job's runtime_env would
        # hold them in plain text. The rule is storage.redact's, which job.json is written with.
        from batchgen.io.storage import secret_keys

        keys = secret_keys(options, "storage.options")
        if keys:
            raise ValueError(
                f"credentials do not belong in the spec ({', '.join(keys)}); take them from the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a "
                "profile (AWS_PROFILE) or the nodes' own role; `submit --env NAME` hands one to a job"
            )
        return options


class JobSpec(_Section):
    name: str | None = Field(default=None, description="A name for logs and the manifest.")
    mode: Literal["generate", "score"] = Field(
        default="generate",
        description="'score': no sampling; each row's input.completion_column is scored under its "
        "prompt (teacher-forced log-likelihood, completion_tokens, perplexity).",
    )
    input: InputSpec
    model: ModelSpec
    generation: GenerationSpec = GenerationSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()

    @model_validator(mode="after")
    def _chunking_is_one_sample(self) -> JobSpec:
        if self.input.long_documents == "chunk" and self.generation.n != 1:
            raise ValueError("input.long_documents: chunk makes one summary per row; use generation.n: 1")
        return self

    @model_validator(mode="after")
    def _mode_fits(self) -> JobSpec:
        g, i = self.generation, self.input
        if self.mode == "score":
            if not i.completion_column:
                raise ValueError("mode: score needs input.completion_column (the text to score)")
            if g.n != 1 or g.structured is not None or i.long_documents == "chunk":
                raise ValueError("mode: score scores one given completion per row: it takes no "
                                 "generation.n > 1, generation.structured or long_documents: chunk")
        elif i.completion_column is not None:
            raise ValueError("input.completion_column needs mode: score")
        s = g.structured
        if s is not None and s.tool_call:
            if not i.tools:
                raise ValueError("generation.structured.tool_call needs input.tools")
            from batchgen.engine.structured import ConstraintError, constraint_for

            try:
                constraint_for(s, i.tools)
            except ConstraintError as e:
                raise ValueError(f"generation.structured.{e} (input.tools)") from None
        clash = [c for c in i.columns if c in self.optional_columns()]
        if clash:
            raise ValueError(f"input.columns {clash} clash with output columns this job writes; "
                             "rename them in the input")
        return self

    def optional_columns(self) -> list[str]:
        """The output columns this job adds to the nine every row has, in order (their types:
        ``rows.OPTIONAL_FIELDS``). ``parsed``/``parse_error`` come with output.parse: json, a
        constraint (is the output complete under it?) or tools (are the calls valid?)."""
        g, i, o = self.generation, self.input, self.output
        if self.mode == "score":
            return ["completion", "completion_tokens", "completion_logprob", "perplexity"] + (
                ["logprobs"] if g.logprobs is not None else [])
        cols = []
        if o.parse == "json" or g.structured is not None or i.tools:
            cols += ["parsed", "parse_error"]
        if i.long_documents == "chunk":
            cols += ["document_tokens", "chunks"]
        if g.logprobs is not None:
            cols += ["logprobs", "cumulative_logprob"]
        if i.tools:
            cols.append("tool_calls")
        if g.reasoning_end is not None:
            cols.append("reasoning")
        return cols

    @model_validator(mode="after")
    def _context_fits(self) -> JobSpec:
        if self.resources.max_batch_tokens < self.generation.max_new_tokens + 1:
            raise ValueError(
                "resources.max_batch_tokens must exceed generation.max_new_tokens, "
                "or no prompt fits in a batch"
            )
        return self
