"""The model as the driver and ``batchgen plan`` see it: its files, not its weights. No torch.

``import transformers`` imports torch whenever torch is installed (transformers 5), which costs
the driver seconds at every start and gigabytes of address space it never uses. What the driver
needs before replicas start is small: the config says the context length, the tokenizer files say
the special tokens and the chat template. Those are JSON and Jinja2 files, read here directly.
A model whose files pass this check may still fail to load in a replica (unknown architecture,
bad weights); the driver reports that as a failed start.

``light_tokenizer`` gives a tokenizer that is enough to count tokens (the ``tokenizers`` library
on ``tokenizer.json``) and to render the chat template (Jinja2, as transformers renders it), for
``batchgen plan``'s estimate.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from batchgen.errors import ModelError, one_line
from batchgen.spec import GenerationSpec, InputSpec, ModelSpec

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# What some configs call it in their JSON (transformers maps these names through attribute_map).
_CONTEXT_ALIASES = ("context_length", "max_seq_len", "model_max_length")


@dataclass(frozen=True)
class ModelFiles:
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    tokenizer_json: str | None  # local path of tokenizer.json, if the model has one


def _file(model: ModelSpec, name: str, required: bool = False) -> str | None:
    """Local path of one of the model's files, or None if it has no such file."""
    if os.path.isdir(model.path):
        path = os.path.join(model.path, name)
        return path if os.path.isfile(path) else None
    if os.path.exists(model.path) or model.path.startswith(("/", ".", "~")):
        raise ModelError(f"model.path {model.path}: not a model directory")
    try:  # a hub id; huggingface_hub imports no torch
        return _hub_file(model, name, required)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo
        raise ModelError(f"model.path {model.path}: cannot fetch {name}: {one_line(e)}") from None


def _hub_file(model: ModelSpec, name: str, required: bool) -> str | None:
    """A file of a hub model, through huggingface_hub's cache. An unreachable hub is found out
    at once, not after huggingface_hub's retries (about 30 s per file), and said in words."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable = None if offline else _unreachable(constants.ENDPOINT)
    try:
        return hf_hub_download(model.path, name, revision=model.revision,
                               local_files_only=offline or unreachable is not None)
    except LocalEntryNotFoundError as e:  # (an EntryNotFoundError too: caught first)
        if not required:
            return None
        if offline:
            where = f"HF_HUB_OFFLINE is set and {name} is not in the local Hugging Face cache"
        elif unreachable:
            where = (f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({unreachable}) "
                     f"to fetch {name}, and it is not in the local cache")
        else:  # it answered, but the download failed (a proxy, a mirror, a server error)
            where = (f"cannot fetch {name} from the Hugging Face Hub at {constants.ENDPOINT} "
                     f"({one_line(e.__cause__ or e)}), and it is not in the local cache")
        raise ModelError(f"model.path {model.path}: {where}; download the model first, or point "
                         "model.path at a local directory or an s3:// one") from None
    except EntryNotFoundError:
        return None


@lru_cache(maxsize=4)
def _unreachable(endpoint: str) -> str | None:
    """Why nothing answers at the hub's address (one TCP connect, a few seconds at most), or
    None. Behind a proxy (HTTPS_PROXY ...) the hub is only reached through it: not checked."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                                   else 80)), timeout=5):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def _json(model: ModelSpec, name: str, required: bool) -> dict[str, Any]:
    path = _file(model, name, required)
    if path is None:
        if required:
            raise ModelError(f"model.path {model.path}: cannot load the model config: no {name}")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        what = "the model config" if name == "config.json" else name
        raise ModelError(f"model.path {model.path}: cannot load {what}: {name}: "
                         f"{one_line(e)}") from None
    if not isinstance(value, dict):
        raise ModelError(f"model.path {model.path}: {name} is not a JSON object")
    return value


def model_files(model: ModelSpec) -> ModelFiles:
    config = _json(model, "config.json", required=True)
    tok_config = _json(model, "tokenizer_config.json", required=False)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates; transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template:
        path = _file(model, "chat_template.jinja")
        if path is not None:
            with open(path, encoding="utf-8") as f:
                template = f.read()
    if not template:
        legacy = _json(model, "chat_template.json", required=False)
        template = legacy.get("chat_template")
    return ModelFiles(config, tok_config, template or None, _file(model, "tokenizer.json"))


def context_length(config: Any, model_max_length: Any = None) -> int | None:
    """The model's context in tokens, from its config, else the tokenizer's model_max_length.

    ``config`` is a loaded transformers config (read by attribute, so ``attribute_map`` aliases
    apply) or the dict of a config.json (read by key, aliases included)."""
    if isinstance(config, dict):
        found = [config.get(n) for n in (*_CONTEXT_KEYS, *_CONTEXT_ALIASES)]
    else:
        found = [getattr(config, n, None) for n in _CONTEXT_KEYS]
    for value in found:
        if isinstance(value, int) and value > 0:
            return value
    ok = isinstance(model_max_length, int) and 0 < model_max_length < 10**7
    return model_max_length if ok else None


def input_budget(model: ModelSpec, gen: GenerationSpec, context: int | None) -> int | None:
    """The longest prompt allowed, checked against the model's context; raises ModelError."""
    if context is not None and gen.max_new_tokens >= context:
        raise ModelError(
            f"generation.max_new_tokens={gen.max_new_tokens} leaves no room for a prompt in "
            f"{model.path}'s context of {context} tokens"
        )
    if model.max_input_tokens is None:
        return None if context is None else context - gen.max_new_tokens
    if context is not None and model.max_input_tokens + gen.max_new_tokens > context:
        raise ModelError(
            f"model.max_input_tokens={model.max_input_tokens} + generation.max_new_tokens="
            f"{gen.max_new_tokens} exceed {model.path}'s context of {context} tokens"
        )
    return model.max_input_tokens


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def check_model(model: ModelSpec, gen: GenerationSpec, inp: InputSpec) -> dict[str, Any]:
    """Cheap pre-flight in the driver: config and tokenizer files read, the context fits, chat
    works. Loads no weights and no torch, so a bad model path or an impossible spec fails
    before replicas start."""
    if model.engine == "echo":
        if inp.chat:
            raise ModelError("model.engine 'echo' has no chat template; set input.chat: false")
        return {"context": None, "max_input_tokens": model.max_input_tokens}
    files = model_files(model)
    tok = files.tokenizer_config
    if files.tokenizer_json is None and not tok:
        raise ModelError(f"model.path {model.path}: cannot load the tokenizer: no tokenizer.json "
                         "or tokenizer_config.json")
    # (No check for a pad or EOS token here: transformers also finds them in
    # special_tokens_map.json and in the tokenizer class's defaults; the replica's tokenizer load
    # refuses a model with neither.)
    if inp.chat and not files.chat_template:
        raise ModelError(
            f"input.chat is true but {model.path} has no chat template; set input.chat: false "
            "or use a chat model"
        )
    context = context_length(files.config, tok.get("model_max_length"))
    return {"context": context, "max_input_tokens": input_budget(model, gen, context)}


class LightTokenizer:
    """Token counts and chat templates from a model's files, without transformers or torch.

    Same call shapes as a transformers tokenizer for what the plan estimate uses:
    ``tok(texts, add_special_tokens=...)["input_ids"]`` and
    ``tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``."""

    def __init__(self, files: ModelFiles):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(files.tokenizer_json)
        self.chat_template = files.chat_template
        cfg = files.tokenizer_config
        self.special = {k: _token(cfg.get(k)) or "" for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token")}

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list]:
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True,
                            **kwargs: Any) -> str | dict[str, list[int]]:
        """The rendered conversation, or with ``tokenize`` ``{"input_ids": [...]}`` as
        transformers 5 returns it (the template writes the special tokens, so none are added)."""
        if not self.chat_template:
            raise ModelError("the model has no chat template")
        # The job's template kwargs win over the special tokens, as in transformers.
        text = _chat_env().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{**self.special, **kwargs})
        if not tokenize:
            return text
        return {"input_ids": self._tok.encode(text, add_special_tokens=False).ids}


def light_tokenizer(model: ModelSpec) -> LightTokenizer | None:
    """A torch-free tokenizer for estimates, or None when the model has no tokenizer.json
    (a slow, sentencepiece-only tokenizer)."""
    files = model_files(model)
    if files.tokenizer_json is None:
        return None
    try:
        return LightTokenizer(files)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelError(f"model.path {model.path}: cannot load the tokenizer: "
                         f"{one_line(e)}") from None


def _chat_env():
    """Jinja2 set up as transformers sets it up for chat templates."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ModelError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
