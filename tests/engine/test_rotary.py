"""Rotary frequencies that depend on the sequence length (longrope, dynamic NTK), per row.

transformers picks a longrope model's factors and a dynamic-NTK model's base from the largest
position of a forward pass; the slot path packs many rows into one pass, so without
``rotary.use_row_rotary`` a short prompt next to a long one got the long one's frequencies. The
reference is Hugging Face's own ``generate`` of the row alone, on a fresh rotary module (dynamic
NTK keeps what it grew from one call to the next, so a stale one is no reference).
"""

from __future__ import annotations

import pytest
import torch
from archs import EOS, PAD, build
from test_slots import (  # noqa: F401 - one_thread is an autouse fixture
    Recorder, assert_bitwise, hf_greedy, one_thread, upto_eos, zoo_engine, zoo_prompts
)

from batchgen.engine import Request, ScoreRequest
from batchgen.engine.attention import Decode, Prefill, Segment, key_length
from batchgen.engine.decoder import SlotDecoder
from batchgen.spec import GenerationSpec

# arch -> the length past which its frequencies change (original_max_position_embeddings for
# longrope, max_position_embeddings for dynamic NTK)
BOUNDARY = {"phi3_longrope": 32, "llama_dynamic": 48}
ARCHS = list(BOUNDARY)


def fresh_rotary(model) -> None:
    """Undo what dynamic NTK grew in earlier calls: Hugging Face alone, from a fresh model."""
    rope = model.model.rotary_emb
    if hasattr(rope, "original_max_seq_len"):
        rope.inv_freq = rope.original_inv_freq.clone()
        rope.max_seq_len_cached = rope.original_max_seq_len


def hf_alone(model, prompt, n: int) -> list[int]:
    fresh_rotary(model)
    return hf_greedy(model, prompt, n)


def prompts_around(arch: str) -> list[tuple[int, ...]]:
    """A short prompt, one whose decode crosses the boundary, one past it (seed 6: none of
    their first 12 tokens is EOS)."""
    b = BOUNDARY[arch]
    return zoo_prompts((10, b - 4, b + 28), seed=6)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_row_gets_its_own_rotary_alone_or_next_to_longer_rows(arch, monkeypatch):
    eng = zoo_engine(arch, max_new_tokens=12, ignore_eos=True)
    assert eng.path == "slots", eng.path_reason
    prompts = prompts_around(arch)
    requests = [Request(p, 100 + i) for i, p in enumerate(prompts)]
    rec = Recorder(monkeypatch)
    together, together_logits = rec.run(eng, requests)  # first: no state may carry to the rest
    for r in requests:
        _, alone = rec.run(eng, [r])
        assert_bitwise(together_logits, alone, f"{arch}, prompt of {len(r.prompt_ids)} alone")
    _, reversed_logits = rec.run(eng, requests[::-1])
    assert_bitwise(reversed_logits, together_logits, f"{arch}, rows in another order")
    for p, c in zip(prompts, together):
        want = hf_alone(eng.model, p, 12)
        assert upto_eos(c.token_ids, {EOS}) == want, f"{arch}, prompt of {len(p)} tokens"
    crossing = upto_eos(together[1].token_ids, {EOS})
    assert len(prompts[1]) + len(crossing) > BOUNDARY[arch] + 1  # its decode went past it


@pytest.mark.parametrize("arch", ARCHS)
def test_the_job_prefix_is_off_for_length_dependent_rotary(arch):
    """A prefix computed once would be rotated by the prefix's length, not the prompt's."""
    eng = zoo_engine(arch, max_new_tokens=8)
    prefix = zoo_prompts((12,), seed=9)[0]
    prompts = [prefix + p for p in zoo_prompts((4, BOUNDARY[arch] + 10))]
    eng.set_prefix(prefix)
    assert eng.prefix == ()
    got = eng.generate([Request(p, i) for i, p in enumerate(prompts)])
    assert eng.stats.prefix_positions == 0
    for p, c in zip(prompts, got):
        assert upto_eos(c.token_ids, eng.eos_ids) == hf_alone(eng.model, p, 8)
    plain = zoo_engine("llama")
    plain.set_prefix(prefix)
    assert plain.prefix == prefix  # a rotary that ignores the length keeps the prefix


def test_scores_of_a_row_do_not_depend_on_longer_rows():
    eng = zoo_engine("phi3_longrope")
    short, long = zoo_prompts((10, 50))
    completion = zoo_prompts((6,), seed=3)[0]
    alone = eng.score([ScoreRequest(short, completion)])[0]
    together = eng.score([ScoreRequest(long, completion), ScoreRequest(short, completion)])[1]
    assert [t.logprob for t in together.logprobs] == [t.logprob for t in alone.logprobs]


def test_rotary_that_ignores_the_length_is_left_alone():
    from batchgen.engine.rotary import by_length, use_row_rotary

    llama = build("llama")
    assert not use_row_rotary(llama) and not by_length(llama)
    assert "forward" not in vars(llama.model.rotary_emb)
    phi3 = build("phi3_longrope")
    ids = torch.tensor([zoo_prompts((40,))[0]])
    before = phi3(input_ids=ids).logits
    assert use_row_rotary(phi3) and use_row_rotary(phi3) and by_length(phi3)
    # outside the slot path's forward, the module is its own (the Hugging Face path, the probe)
    assert torch.equal(phi3(input_ids=ids).logits, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_cos_sin_equal_the_module_alone(arch):
    """Each row of a packed prefill, and each row of a decode step, gets bitwise the cos/sin
    Hugging Face's fresh module gives that row alone."""
    from batchgen.engine.rotary import bind_rows, use_row_rotary

    model = build(arch)
    rope = model.model.rotary_emb
    b = BOUNDARY[arch]
    lengths = [5, b, b + 1, b + 20, 3]  # packed widths: the lengths rounded up to 8
    widths = [-(-n // 8) * 8 for n in lengths]
    x = torch.zeros(1, 1, 8)

    def alone(position_ids):
        fresh_rotary(model)
        return rope(x, position_ids)

    want = [alone(torch.arange(n)[None]) for n in lengths]
    assert not torch.equal(want[1][0][0, :4], want[2][0][0, :4])  # the boundary matters
    use_row_rotary(model)
    positions = torch.cat([torch.arange(w).clamp(max=n - 1) for n, w in zip(lengths, widths)])[None]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    step = Prefill(None, [Segment(torch.tensor([i]), 0, w, s)
                          for i, (w, s) in enumerate(zip(widths, starts))])
    fresh_rotary(model)
    with bind_rows(model, positions, step):
        cos, sin = rope(x, positions)
    for n, s, (c, si) in zip(lengths, starts, want):
        assert torch.equal(cos[0, s:s + n], c[0]) and torch.equal(sin[0, s:s + n], si[0]), n
    decode = torch.tensor([n - 1 for n in lengths])
    with bind_rows(model, decode[:, None], Decode(None, torch.arange(5), decode, [])):
        cos, sin = rope(x, decode[:, None])
    for i, (c, si) in enumerate(want):  # the last token of each row: position n - 1
        assert torch.equal(cos[i, 0], c[0, -1]) and torch.equal(sin[i, 0], si[0, -1])
    cos, _ = rope(x, decode[:, None])  # unbound: the module's own (one length for all rows)
    assert not torch.equal(cos[0, 0], want[0][0][0, -1])


def test_a_decode_step_across_the_boundary_traces_with_fullgraph():
    """The longrope choice is made on the device (no host sync): the step stays capturable."""
    from batchgen.engine.rotary import use_row_rotary

    model = build("phi3_longrope")
    assert use_row_rotary(model)
    gen = GenerationSpec(max_new_tokens=4, ignore_eos=True)
    decoder = SlotDecoder(model, gen, eos_ids=set(), pad_id=PAD, slots=4, max_batch_tokens=4096,
                          hit_stop=lambda ids: False)
    prompts = zoo_prompts((28, 9))
    decoder.run([Request(p, i) for i, p in enumerate(prompts)])
    cache = decoder.cache
    positions = torch.tensor([32, 12, 0, 0])  # row 0 past the boundary, row 1 before it
    slots = torch.tensor([0, 1, cache.scratch, cache.scratch])
    groups = [(torch.arange(4), key_length(32))]
    ids = torch.tensor([[5], [6], [PAD], [PAD]])

    def step(ids, positions, handle):
        return decoder.logits(decoder.hidden(ids, positions[:, None], handle)[:, -1])

    with torch.inference_mode():
        saved = {i: (k.clone(), cache.values[i].clone()) for i, k in cache.keys.items()}
        eager = step(ids, positions, Decode(cache, slots, positions, groups))
        for i, (k, v) in saved.items():
            cache.keys[i].copy_(k)
            cache.values[i].copy_(v)
        torch._dynamo.reset()
        try:
            traced = torch.compile(step, fullgraph=True, backend="eager")(
                ids, positions, Decode(cache, slots, positions, groups))
        finally:
            torch._dynamo.reset()
    assert torch.equal(traced, eager)
