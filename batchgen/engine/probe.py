"""The load-time probe: may this model run on the slot path?

A few small prompts go through the slot decoder (greedy, EOS ignored) and through the model's
own Hugging Face attention; the slot path serves the model only if every layer called the slot
attention function, the LM head applied to the base model's output gives the model's own logits,
and every token it chose is also Hugging Face's choice (a near tie, within ``TIE``, counts as a
match). Anything else — an exception, a layer that bypasses ``AttentionInterface``, softcapping,
sinks, ALiBi, logit scaling outside the LM head — sends the model to the Hugging Face path, with
the reason. Never silently wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from batchgen.engine.attention import NAME, Unsupported, use_own, use_slots
from batchgen.engine.completions import Request
from batchgen.errors import one_line

log = logging.getLogger("batchgen.engine")

NEW_TOKENS = 4
TIE = 1e-3  # relative logit gap below which a different argmax counts as a tie (fp32)
TIE_HALF = 3e-2  # the same in bf16/fp16


def probe_prompts(vocab: int, context: int | None) -> list[tuple[int, ...]]:
    longest = min(80, (context or 256) - NEW_TOKENS - 2)
    span = max(2, min(vocab, 1000) - 3)
    return [tuple(3 + (7 * i + 5 * k) % span for i in range(n))
            for k, n in enumerate((5, 19, max(6, longest)))]


def probe(model: Any, make_decoder, context: int | None) -> tuple[bool, str]:
    """(True, "") when the slot path serves ``model``; else (False, why). ``make_decoder``:
    () -> a SlotDecoder over this model, greedy, EOS ignored, at most NEW_TOKENS new tokens.
    Leaves the model on the slot attention when it passes, on its own otherwise."""
    try:
        use_slots(model)
        if model.config._attn_implementation != NAME:
            return False, "the model does not take a registered attention function"
        ok, why = _compare(model, make_decoder(), context)
    except Unsupported as e:
        ok, why = False, str(e)
    except Exception as e:  # noqa: BLE001 - any failure means: use the other path
        ok, why = False, f"{type(e).__name__}: {one_line(str(e), 200)}"
    if not ok:
        use_own(model)
    return ok, why


@torch.inference_mode()
def _compare(model: Any, decoder: Any, context: int | None) -> tuple[bool, str]:
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = probe_prompts(vocab, context)
    got = decoder.run([Request(p, 0) for p in prompts])
    layers = model.config.num_hidden_layers
    seen = decoder.layers_seen
    if len(seen) < layers:
        return False, f"only {len(seen)} of {layers} layers called the slot attention"
    tie = TIE if next(model.parameters()).dtype == torch.float32 else TIE_HALF
    use_own(model)  # the reference: the model's own attention
    try:
        # The decoder's logits are head(base_model(...)): a model that scales or caps its
        # logits after the head (granite, cohere) keeps its argmax but not its distribution.
        ids = torch.tensor([list(prompts[0])], device=decoder.device)
        own = model(input_ids=ids, use_cache=False).logits.float()
        head = decoder.head(model.base_model(input_ids=ids, use_cache=False)[0]).float()
        if not torch.allclose(head, own, rtol=tie, atol=tie * max(1.0, float(own.abs().max()))):
            return False, "the model transforms its logits after the LM head (scaling, softcap)"
        for prompt, (tokens, *_) in zip(prompts, got):
            ids = torch.tensor([list(prompt) + tokens[:-1]], device=decoder.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
            for step, token in enumerate(tokens):
                row = logits[step]
                best = row.max()
                if row[token] < best - tie * max(1.0, float(best.abs())):
                    return False, (f"its tokens differ from the model's own attention (probe "
                                   f"prompt of {len(prompt)} tokens, new token {step})")
    finally:
        use_slots(model)
    return True, ""
