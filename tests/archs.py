"""Tiny random-weight causal LMs of many architectures, built from configs (no download).

Helper module for tests (not a test file). ``build(arch)`` returns a 2-layer model in eval() mode
with deterministic weights; vocab ``VOCAB``, pad=0, eos=1, bos=2, max_position_embeddings=256.

Facts (transformers 5.24, torch 2.13 CPU), checked by a probe attention function registered with
``AttentionInterface`` that delegates to ``sdpa_attention_forward``, called as
``model(input_ids=..., position_ids=..., use_cache=False, batchgen_probe=x)``; ``check_all()``
re-verifies them:

arch                 servable  why not                                    sliding  GQA  head
llama                yes                                                  -        yes  yes
gpt2                 yes                                                  -        no   yes
qwen2                yes                                                  -        yes  yes
qwen2_mixed_sliding  yes                                                  [-, 8]   yes  yes
qwen3                yes                                                  -        yes  yes
mistral_sliding      yes                                                  [8, 8]   yes  yes
phi3                 yes                                                  -        yes  yes
gpt_neox             yes                                                  -        no   yes
gemma                yes                                                  -        yes  yes
gemma3_text_sliding  yes                                                  [8, -]   yes  yes
olmo2                yes                                                  -        yes  yes
starcoder2_sliding   yes                                                  [8, 8]   yes  yes
granite              yes       (logits / logits_scaling)                  -        yes  NO
cohere               yes       (logits * logit_scale)                     -        yes  NO
mixtral              yes       (MoE: 4 experts, top-2)                    -        yes  yes
qwen2_moe            yes       (MoE, shared expert with a sigmoid gate)   -        yes  yes
olmoe                yes       (MoE)                                      -        yes  yes
stablelm             no        decoder layer drops **kwargs               -        yes  yes
gemma2               no        softcap kwarg; final logit softcap         [8, -]   yes  NO
gpt_oss              no        s_aux kwarg (sinks)                        [8, -]   yes  yes
bloom                no        alibi; not via AttentionInterface          n/a      no   yes
falcon (alibi=True)  no        alibi; not via AttentionInterface          n/a      no   yes

Other measured facts: the kwargs reaching attention are dropout, scaling, position_ids, plus
use_cache (most), sliding_window (qwen2/3, mistral, phi3, starcoder2, gemma2/3, gpt_oss: None on
full layers), softcap (gemma2), s_aux and output_router_logits (gpt_oss).  ``scaling`` is not always
head_dim**-0.5 (granite: attention_multiplier 0.25; gemma3: query_pre_attn_scalar**-0.5 = 0.25), so
use the kwarg.  query (B, 4, T, 8), key/value (B, 2, T, 8) with GQA, else (B, 4, T, 8).  With T=12 >
window 8 a plain causal sdpa (the probe) differs from HF on the sliding archs, so the window matters
in these configs.  Left-padded greedy generate gives, per row, the same tokens as the prompt alone
(rows that hit EOS=1 early are PAD-filled).  bloom/falcon: set_attn_implementation() only warns and
keeps their own attention.

Columns: "servable" = the probe was called once per layer on modules with layer_idx, the extra
kwarg reached it, and no softcap/s_aux kwarg arrived; "sliding" = ``sliding_window`` kwarg per
layer; "GQA" = key heads < query heads (4 q / 2 kv); "head" = whether
``get_output_embeddings()(base_model(...).last_hidden_state)`` is torch.equal to
``model(...).logits``.  Every arch here also runs greedy ``generate`` on a left-padded batch of 3
prompts.  Archs with ``head_matches=False`` are servable only if the engine applies the model's own
logit scaling (granite divides by logits_scaling, cohere multiplies by logit_scale).
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 96
PAD, EOS, BOS = 0, 1, 2

_TOK = {
    "vocab_size": VOCAB,
    "pad_token_id": PAD,
    "eos_token_id": EOS,
    "bos_token_id": BOS,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}
_LLAMA_LIKE = dict(
    _TOK,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# arch -> {"model_type", "config": kwargs for AutoConfig.for_model, facts...}
# facts (added from _FACTS below): servable, why (reason refused), sliding (sliding_window kwarg
# per layer), gqa, head_matches.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "config": dict(_LLAMA_LIKE)},
    "gpt2": {
        "model_type": "gpt2",
        "config": dict(
            {k: v for k, v in _TOK.items() if k != "max_position_embeddings"},
            n_positions=256,
            n_embd=32,
            n_inner=64,
            n_layer=2,
            n_head=4,
        ),
    },
    "qwen2": {"model_type": "qwen2", "config": dict(_LLAMA_LIKE)},
    "qwen2_mixed_sliding": {
        "model_type": "qwen2",
        "config": dict(
            _LLAMA_LIKE, use_sliding_window=True, sliding_window=8, max_window_layers=1
        ),
    },
    "qwen3": {"model_type": "qwen3", "config": dict(_LLAMA_LIKE, head_dim=8)},
    "mistral_sliding": {
        "model_type": "mistral",
        "config": dict(_LLAMA_LIKE, sliding_window=8),
    },
    "phi3": {"model_type": "phi3", "config": dict(_LLAMA_LIKE, sliding_window=None)},
    "gpt_neox": {
        "model_type": "gpt_neox",
        "config": dict(
            _TOK,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
        ),
    },
    "gemma": {"model_type": "gemma", "config": dict(_LLAMA_LIKE, head_dim=8)},
    "gemma3_text_sliding": {
        "model_type": "gemma3_text",
        "config": dict(
            _LLAMA_LIKE,
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    },
    "olmo2": {"model_type": "olmo2", "config": dict(_LLAMA_LIKE)},
    "starcoder2_sliding": {
        "model_type": "starcoder2",
        "config": dict(_LLAMA_LIKE, sliding_window=8),
    },
    "stablelm": {
        "model_type": "stablelm",
        "config": dict(_LLAMA_LIKE, partial_rotary_factor=0.5),
    },
    "granite": {
        "model_type": "granite",
        "config": dict(
            _LLAMA_LIKE,
            logits_scaling=4.0,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.25,
        ),
    },
    "cohere": {"model_type": "cohere", "config": dict(_LLAMA_LIKE, logit_scale=0.5)},
    # rotary frequencies that depend on the sequence length (head_dim 8: 4 factors)
    "phi3_longrope": {  # Phi-3-128k style: short factors up to 32 positions, long ones past them
        "model_type": "phi3",
        "config": dict(
            _LLAMA_LIKE,
            sliding_window=None,
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.25, 1.5, 2.0],
                "long_factor": [1.0, 3.0, 9.0, 27.0],
                "original_max_position_embeddings": 32,
                "factor": 8.0,  # max_position_embeddings / original_max_position_embeddings
            },
        ),
    },
    "llama_dynamic": {  # dynamic NTK: the base grows with the length past 48 positions
        "model_type": "llama",
        "config": dict(
            _LLAMA_LIKE,
            max_position_embeddings=48,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        ),
    },
    # mixture of experts (4 experts, top-2); the experts' intermediate sizes are multiples of 64
    "mixtral": {
        "model_type": "mixtral",
        "config": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    },
    "qwen2_moe": {  # with a shared expert and its sigmoid gate
        "model_type": "qwen2_moe",
        "config": dict(
            _LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
    },
    "olmoe": {
        "model_type": "olmoe",
        "config": dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2),
    },
    # refused
    "gemma2": {
        "model_type": "gemma2",
        "config": dict(
            _LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=8
        ),
    },
    "gpt_oss": {
        "model_type": "gpt_oss",
        "config": dict(
            _LLAMA_LIKE,
            head_dim=8,
            sliding_window=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    },
    "bloom": {
        "model_type": "bloom",
        "config": dict(
            {k: v for k, v in _TOK.items() if k != "max_position_embeddings"},
            hidden_size=32,
            n_layer=2,
            n_head=4,
        ),
    },
    "falcon": {
        "model_type": "falcon",
        "config": dict(
            _TOK,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
        ),
    },
}

# Measured facts: arch -> (servable, why refused, sliding_window kwarg per layer, gqa, head_matches)
_FACTS: dict[str, tuple] = {
    "llama": (True, None, [None, None], True, True),
    "gpt2": (True, None, [None, None], False, True),
    "qwen2": (True, None, [None, None], True, True),
    "qwen2_mixed_sliding": (True, None, [None, 8], True, True),
    "qwen3": (True, None, [None, None], True, True),
    "mistral_sliding": (True, None, [8, 8], True, True),
    "phi3": (True, None, [None, None], True, True),
    "gpt_neox": (True, None, [None, None], False, True),
    "gemma": (True, None, [None, None], True, True),
    "gemma3_text_sliding": (True, None, [8, None], True, True),
    "olmo2": (True, None, [None, None], True, True),
    "starcoder2_sliding": (True, None, [8, 8], True, True),
    "granite": (True, None, [None, None], True, False),
    "cohere": (True, None, [None, None], True, False),
    "phi3_longrope": (True, None, [None, None], True, True),
    "llama_dynamic": (True, None, [None, None], True, True),
    "mixtral": (True, None, [None, None], True, True),
    "qwen2_moe": (True, None, [None, None], True, True),
    "olmoe": (True, None, [None, None], True, True),
    "stablelm": (
        False,
        "decoder layer drops **kwargs: extra kwarg never reaches attention",
        [None, None],
        True,
        True,
    ),
    "gemma2": (
        False,
        "softcap kwarg (attn_logit_softcapping); final_logit_softcapping on logits",
        [8, None],
        True,
        False,
    ),
    "gpt_oss": (False, "s_aux kwarg (attention sinks)", [8, None], True, True),
    "bloom": (
        False,
        "alibi; own attention code, not AttentionInterface (probe never called)",
        [],
        False,
        True,
    ),
    "falcon": (
        False,
        "alibi; own attention code, not AttentionInterface (probe never called)",
        [],
        False,
        True,
    ),
}
for _arch, (_serv, _why, _sw, _gqa, _head) in _FACTS.items():
    ARCHS[_arch].update(
        servable=_serv, why=_why, sliding=_sw, gqa=_gqa, head_matches=_head
    )

SERVABLE: list[str] = [a for a, f in ARCHS.items() if f["servable"]]
REFUSED: list[str] = [a for a, f in ARCHS.items() if not f["servable"]]
SLIDING: list[str] = [a for a in SERVABLE if any(ARCHS[a]["sliding"])]
MOE: list[str] = ["mixtral", "qwen2_moe", "olmoe"]  # gpt_oss too, but the slot path refuses it


class ZooTokenizer:
    """What the engine needs of a tokenizer (the zoo's models have no vocabulary files)."""

    pad_token_id, eos_token_id, model_max_length = PAD, EOS, 256

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def build(arch: str, *, seed: int = 0, dtype=torch.float32):
    """A tiny eval() model of ``arch`` with weights fixed by ``seed`` (global RNG left untouched)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = ARCHS[arch]
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


PROBE_NAME = "batchgen_test_probe"
_PROBE_CALLS: list[dict] = []


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _PROBE_CALLS.append(
        {
            "layer_idx": getattr(module, "layer_idx", None),
            "probe": kwargs.get("batchgen_probe"),
            "kwargs": sorted(k for k in kwargs if k != "batchgen_probe"),
            "sliding_window": kwargs.get("sliding_window"),
            "softcap": kwargs.get("softcap"),
            "s_aux": kwargs.get("s_aux") is not None,
            "scaling": kwargs.get("scaling"),
            "mask_is_none": attention_mask is None,
            "q": tuple(query.shape),
            "k": tuple(key.shape),
            "v": tuple(value.shape),
        }
    )
    kwargs.pop("batchgen_probe", None)
    kwargs.pop("s_aux", None)
    kwargs.pop("softcap", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_NAME, _probe_attention)


def _prompts(seed: int = 1, lengths=(3, 5, 7)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _left_pad(prompts: list[list[int]]):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def probe(arch: str) -> dict[str, Any]:
    """Measure the facts of ``arch`` (see the module docstring)."""
    model = build(arch)
    n_layers = model.config.num_hidden_layers
    out: dict[str, Any] = {"arch": arch}

    # 1. greedy generate on a left-padded batch (default attention); also: same tokens as alone?
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=PAD,
    )
    new = gen[:, ids.shape[1] :]
    out["generate_ok"] = tuple(new.shape) == (3, 8)
    alone = [
        model.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=PAD,
        )[0, len(p) :]
        for p in prompts
    ]
    # rows that hit EOS early are PAD-filled in the batch
    out["pad_consistent"] = all(
        torch.equal(row[: len(a)], a) and bool((row[len(a) :] == PAD).all())
        for a, row in zip(alone, new)
    )

    # 3. lm_head(base_model(...).last_hidden_state) == logits
    T = 12  # > sliding_window=8
    x = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T).expand(2, T)
    ref = model(input_ids=x, position_ids=pos, use_cache=False).logits
    hidden = model.base_model(
        input_ids=x, position_ids=pos, use_cache=False
    ).last_hidden_state
    out["head_matches"] = torch.equal(model.get_output_embeddings()(hidden), ref)

    # 2. the probe attention function
    _register_probe()
    token = object()
    _PROBE_CALLS.clear()
    try:
        model.set_attn_implementation(PROBE_NAME)
        logits = model(
            input_ids=x, position_ids=pos, use_cache=False, batchgen_probe=token
        ).logits
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - recorded as a fact
        logits, out["error"] = None, f"{type(e).__name__}: {e}"[:160]
    calls = list(_PROBE_CALLS)
    _PROBE_CALLS.clear()
    out["attn_per_layer"] = [c["layer_idx"] for c in calls] == list(range(n_layers))
    out["kwarg_arrives"] = bool(calls) and all(c["probe"] is token for c in calls)
    out["sliding"] = [c["sliding_window"] for c in calls]
    out["softcap"] = any(c["softcap"] is not None for c in calls)
    out["sinks"] = any(c["s_aux"] for c in calls)
    out["gqa"] = bool(calls) and calls[0]["k"][1] < calls[0]["q"][1]
    out["shapes"] = (calls[0]["q"], calls[0]["k"]) if calls else None
    out["kwargs"] = calls[0]["kwargs"] if calls else None
    out["scaling"] = [c["scaling"] for c in calls]
    # probe = plain causal sdpa, no sliding window/softcap/sinks: equal to HF only where those are absent
    out["probe_close"] = logits is not None and torch.allclose(logits, ref, atol=1e-5)
    return out


def check_all() -> dict[str, dict[str, tuple]]:
    """Re-measure every arch; returns {arch: {fact: (expected, measured)}} for the facts that differ
    (empty dicts when all hold). Also checks build() determinism. About 3 s on CPU."""
    problems: dict[str, dict[str, tuple]] = {}
    for arch, spec in ARCHS.items():
        r = probe(arch)
        via_interface = r["attn_per_layer"]
        servable = (
            via_interface and r["kwarg_arrives"] and not r["softcap"] and not r["sinks"]
        )
        got = {
            "servable": servable,
            "sliding": r["sliding"] if via_interface else [],
            "gqa": r["gqa"],
            "head_matches": r["head_matches"],
            "generate_ok": r["generate_ok"],
            "pad_consistent": r["pad_consistent"],
            "error": r["error"],
        }
        want = {
            "servable": spec["servable"],
            "sliding": spec["sliding"],
            "gqa": spec["gqa"],
            "head_matches": spec["head_matches"],
            "generate_ok": True,
            "pad_consistent": True,
            "error": None,
        }
        if servable:
            # a plain causal sdpa equals HF exactly when no sliding window (T=12 > window 8)
            got["probe_close"], want["probe_close"] = (
                r["probe_close"],
                not any(spec["sliding"]),
            )
        problems[arch] = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    a, b, c = (build("llama", seed=s).state_dict() for s in (0, 0, 1))
    same = all(torch.equal(a[k], b[k]) for k in a)
    differs = any(not torch.equal(a[k], c[k]) for k in a)
    problems["_determinism"] = (
        {} if same and differs else {"seed": ((True, True), (same, differs))}
    )
    return problems
