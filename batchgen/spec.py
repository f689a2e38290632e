"""The job spec: one YAML file, validated by frozen pydantic models.

Every key has a default where one makes sense and unknown keys are an error. Errors name the file
and the dotted key: ``job.yaml: generation.top_p: Input should be less than or equal to 1, got 1.5``.
``--set section.key=value`` overrides are applied to the raw YAML before validation, so they get
the same checks and messages. The YAML loader refuses duplicate keys and alias bombs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from batchgen.errors import SpecError

# Columns every output row has (see the README's output layout); input.columns may not reuse them.
OUTPUT_COLUMNS = (
    "row_id", "sample_index", "prompt", "generation", "finish_reason",
    "prompt_tokens", "generated_tokens", "error", "seed",
    "parsed", "parse_error", "document_tokens", "chunks",
)


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

    @model_validator(mode="after")
    def _sampling_for_many(self) -> GenerationSpec:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                "n > 1 needs temperature > 0: greedy decoding would give n identical samples"
            )
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
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
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"json_schema is not a valid JSON Schema: {e.message}") from None
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
        from batchgen.storage import secret_keys

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
    def _context_fits(self) -> JobSpec:
        if self.resources.max_batch_tokens < self.generation.max_new_tokens + 1:
            raise ValueError(
                "resources.max_batch_tokens must exceed generation.max_new_tokens, "
                "or no prompt fits in a batch"
            )
        return self


# -- loading ---------------------------------------------------------------------------------


# A job spec is a few hundred YAML nodes. An alias bomb ("billion laughs": nested anchors, each
# alias repeating the one before) is a few hundred bytes that expand to billions of nodes once
# copied or validated; it is refused while still a small graph of shared nodes.
MAX_YAML_NODES = 100_000


class _Refused(Exception):
    """YAML that parses but is refused; the message lacks only where it came from."""


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (the second ``input:`` silently replaced the
    first) and documents larger than MAX_YAML_NODES with their aliases expanded."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable; SafeLoader says so below
                continue
            if duplicate:
                raise _Refused(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes the document has with aliases expanded, without expanding them: a
    depth-first walk that sizes each distinct node once (an alias is the same node object)."""
    sizes: dict[int, int] = {}
    started: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(
            node, yaml.MappingNode) else node.value if isinstance(node, yaml.SequenceNode) else []
        if finished:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise _Refused(
                    f"more than {MAX_YAML_NODES} YAML nodes once aliases are expanded (an alias "
                    "bomb?); write the spec out without nested &anchors/*aliases"
                )
        elif id(node) not in sizes:
            if id(node) in started:
                raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a node "
                               "that contains it")
            started.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise _Refused("nested too deeply") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars/lists."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected section.key=value")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = _load_yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {item!r}: value is not valid YAML: {_yaml_error(e)}") from None
        except _Refused as e:
            raise SpecError(f"--set {item!r}: {e}") from None
    return result


def _expect_mapping(raw: Any, source: str) -> None:
    if not isinstance(raw, dict):
        kind = {"str": "string", "int": "number", "float": "number"}.get(
            type(raw).__name__, type(raw).__name__)
        raise SpecError(f"{source}: expected a mapping of sections (input:, model:, output:, "
                        f"...), got a YAML {kind}")


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    _expect_mapping(raw, source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None


SPEC_ENV_PREFIX = "env:"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load a YAML spec file, or with ``env:NAME`` the YAML text held in environment variable
    NAME (how ``batchgen submit`` ships a spec to a cluster inside the Ray job's runtime_env)."""
    if str(path).startswith(SPEC_ENV_PREFIX):
        name = str(path)[len(SPEC_ENV_PREFIX):]
        if name not in os.environ:
            raise SpecError(f"{path}: environment variable {name} is not set")
        text = os.environ[name]
    else:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise SpecError(f"{path}: cannot read job spec: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                            "save the file as UTF-8") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {_yaml_error(e)}") from None
    except _Refused as e:
        raise SpecError(f"{path}: {e}") from None
    raw = {} if raw is None else raw
    _expect_mapping(raw, str(path))  # before --set, which needs sections to set keys in
    return parse_spec(apply_overrides(raw, overrides), str(path))


def _yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, then what."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: "
    context = f" ({e.context})" if getattr(e, "context", None) else ""
    return f"{where}{e.problem}{context}"


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key" + _allowed_keys(err["loc"])
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                got = repr(err["input"])
                msg += f", got {got if len(got) <= 80 else got[:77] + '...'}"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
