"""What structured generation, logprobs and scoring cost, each measured against the engine's plain
run on the same prompts and model. Two models: the tiny model (vocab 449), and a GPT-2-small-
shaped model with random weights (``bench_engine.gpt2_small_random``) whose tokenizer is a byte-
level BPE of GPT-2's size (50257 ids, EOS 50256), trained offline on first use and cached outside
the repository (``gpt2ish_tokenizer``): a token mask's cost grows with the vocabulary, so it has to
be measured at a real one. Prints JSON lines (``emit``); every ratio is measured within one run.

1. Constrained vs unconstrained: 32 chat-like prompts asking for JSON, temperature 0.9, up to 64
   new tokens, EOS honoured; the constrained side's rows carry a question/answer JSON Schema
   (maxLength-bounded strings), so they stop when the object closes. Rows differ in length
   between the sides, so the figure is tokens/s (generated tokens / seconds), with the mean
   tokens per row on each side. Target: constrained >= 0.8x unconstrained. Different lengths
   mean different work (a short row buys fewer tokens per prefill and leaves its slot empty),
   so the same comparison runs again at equal work: EOS ignored, exactly 64 tokens per row, and
   a schema (at least 8 Q&A cards) still open at the last token, so every step has live masks.
2. Mask cost, from the constrained engines' ``grammars.stats``: milliseconds per decode step
   (all rows' masks of a step, computed in parallel) and per row-step, and their share of the run.
3. Compile cost: five distinct JSON Schemas through a fresh ``structured.Grammars`` (one compile
   each; a replica pays it once per distinct schema), and the first-use tokenizer wrap apart.
4. Logprobs: the equal-work plain run again with ``generation.logprobs=5`` (same seeds, so the
   same tokens): tokens/s and the ratio to the plain run.
5. Scoring vs prefill: (prompt, 32-token completion) pairs through ``engine.score``, against the
   same token sequences as prompts of a ``max_new_tokens=1`` generation (the prefill rate), both
   as prompt+completion tokens per second.

Sections 1 and 4's five sides run interleaved (rotating which goes first), and 5's two sides
alternate, so load from other work on the shared cores falls on every side alike; each side's
best round counts. Each engine gets an untimed warm-up call first (the slot cache, the compile);
its stats are read as differences from then. Full run: about 3 minutes on 2 cores; ``--quick``:
about 30 s (plus ~10 s once to train the tokenizer).

    python benchmarks/bench_structured.py [--quick] [--only tiny|gpt2]
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import random
import sysconfig
from pathlib import Path

import torch
from bench_engine import gpt2_small_random, make_engine, rounded, target_fields, timed_generate
from common import Timer, cpu_pressure, emit, environment, log, tiny_model

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchgen-bench"
GPT2ISH = CACHE / "gpt2ish-50257"
TEMPERATURE, MAX_NEW, LOGPROBS, SCORE_COMPLETION = 0.9, 64, 5, 32

# Bounded strings keep a weak model's object inside max_new_tokens (it would otherwise write
# string content until the limit and come back truncated).
QA_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string", "maxLength": 40},
                   "answer": {"type": "string", "maxLength": 60}},
    "required": ["question", "answer"],
    "additionalProperties": False,
}
# Flash cards, at least 8: no model here closes it within 64 tokens, so with EOS ignored every
# step of the fixed-length side is masked by a live grammar (not the EOS-only tail).
CARDS_SCHEMA = {
    "type": "object",
    "properties": {"cards": {"type": "array", "items": QA_SCHEMA, "minItems": 8,
                             "maxItems": 16}},
    "required": ["cards"],
    "additionalProperties": False,
}
# Section 3's five distinct schemas: the Q&A one, a tool call (enum, nested object, bounded
# integer), any object, a bounded list of records, and a record with a pattern and a format.
COMPILE_SCHEMAS = {
    "qa": QA_SCHEMA,
    "tool_call": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": ["get_weather", "search_web", "book_flight"]},
            "arguments": {
                "type": "object",
                "properties": {
                    "location": {"type": "object",
                                 "properties": {"city": {"type": "string"},
                                                "country": {"type": "string"}},
                                 "required": ["city", "country"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    "units": {"type": "string", "enum": ["metric", "imperial"]},
                },
                "required": ["location", "days", "units"],
            },
        },
        "required": ["name", "arguments"],
    },
    "any_object": {"type": "object"},
    "list_of_items": {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 5, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 0},
                           "price": {"type": "number"}},
            "required": ["sku", "qty"]}}},
        "required": ["items"],
    },
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30},
                       "email": {"type": "string", "format": "email"},
                       "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130},
                       "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age"],
    },
}


# -- models and prompts --------------------------------------------------------------------------

def gpt2ish_tokenizer(budget_chars: int = 40_000_000) -> Path:
    """A byte-level BPE with GPT-2's size: 50256 merges-built tokens + <|endoftext|> (id 50256),
    trained with ``tokenizers`` on ~40 MB of .py/.md/.txt from this interpreter's site-packages
    (GPT-2's own files are out of reach offline). ~10 s once; cached under ~/.cache."""
    if (GPT2ISH / "tokenizer.json").exists():
        return GPT2ISH
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    site = sysconfig.get_paths()["purelib"]
    files = sorted(f for ext in ("py", "md", "txt")
                   for f in glob.glob(f"{site}/**/*.{ext}", recursive=True))
    random.Random(0).shuffle(files)

    def texts():
        seen = 0
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8", errors="ignore")
            except OSError:
                continue
            seen += len(text)
            yield text
            if seen > budget_chars:
                return

    log(f"training a 50257-token byte-level BPE on {site} (once; cached in {GPT2ISH})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=50256, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with Timer() as t:
        tok.train_from_iterator(texts(), trainer=trainer)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    if tok.get_vocab_size() != 50257:
        raise RuntimeError(f"trained {tok.get_vocab_size()} tokens, expected 50257: too little "
                           f"text under {site}?")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>")
    partial = GPT2ISH.with_name(GPT2ISH.name + f".tmp{os.getpid()}")
    hf.save_pretrained(partial)
    partial.rename(GPT2ISH)  # whole or absent: a run killed mid-save leaves no half cache
    log(f"tokenizer trained in {t.seconds:.1f}s")
    return GPT2ISH


ASKS = [("Write a question about {t} and answer it. Reply in JSON with the keys question and "
         "answer."),
        "Give me one quiz question on {t}, with its answer, as a JSON object.",
        ("I am making flash cards about {t}. Return one card as JSON: "
         "{{\"question\": ..., \"answer\": ...}}. Keep both short."),
        "JSON only: a question someone might ask about {t}, and a one-sentence answer."]
TOPICS = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music", "bread",
          "mountains", "volcanoes", "the printing press", "bees", "glaciers"]


def json_prompts(tokenizer, count: int) -> list[tuple[int, ...]]:
    """Chat turns asking for a JSON Q&A object, rendered with the model's chat template (a plain
    User/Assistant transcript for a tokenizer without one). Seeded."""
    rng = random.Random(11)
    out = []
    for i in range(count):
        ask = ASKS[i % len(ASKS)].format(t=rng.choice(TOPICS))
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": ask}],
                                                 add_generation_prompt=True, tokenize=False)
        else:
            text = f"User: {ask}\nAssistant: "
        out.append(tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def warm_up(engine, requests) -> None:
    """One short untimed call: the slot cache, the kernels and (constrained) the compile."""
    gen = engine.gen
    engine.gen = gen.model_copy(update={"max_new_tokens": 4})
    timed_generate(engine, requests[:2])
    engine.gen = gen


# -- 1, 2, 4: constrained, unconstrained, logprobs ----------------------------------------------

def _throughput_sides(model, tokenizer, prompts, slots, new_tokens) -> dict:
    """side -> (engine, requests). The first two are section 1 as asked (EOS honoured, the
    constrained rows stop when the object closes). The ``fixed_length`` sides generate exactly
    ``new_tokens`` per row (EOS ignored) so both do the same work, and their schema keeps the
    object open that long (at least 8 cards), so every step's masks are real ones; logprobs are
    measured against that plain side (same seeds, same tokens)."""
    from batchgen.engine.engine import Request
    from batchgen.spec import GenerationSpec, StructuredSpec
    from batchgen.spec.constraints import constraint_for

    qa = constraint_for(StructuredSpec(json_schema=QA_SCHEMA))
    cards = constraint_for(StructuredSpec(json_schema=CARDS_SCHEMA))
    gen = GenerationSpec(max_new_tokens=new_tokens, temperature=TEMPERATURE)
    fixed = gen.model_copy(update={"ignore_eos": True})
    with_lp = fixed.model_copy(update={"logprobs": LOGPROBS})

    def side(spec, constraint=None):
        requests = [Request(p, 100 + i, constraint) for i, p in enumerate(prompts)]
        return make_engine(model, tokenizer, spec, slots, max_batch_tokens=32768), requests

    return {"unconstrained": side(gen), "constrained": side(gen, qa),
            "unconstrained_fixed_length": side(fixed),
            "constrained_fixed_length": side(fixed, cards),
            "logprobs_fixed_length": side(with_lp)}


def bench_throughput(name, model, tokenizer, prompts, rounds, slots, new_tokens=MAX_NEW) -> dict:
    from jsonschema import Draft202012Validator

    model.eval()
    sides = _throughput_sides(model, tokenizer, prompts, slots, new_tokens)
    log(f"{name} throughput: {len(prompts)} prompts "
        f"({sum(map(len, prompts)) / len(prompts):.0f} tokens each), up to {new_tokens} new, "
        f"{slots} slots, {rounds} round(s) of {len(sides)} sides")
    for engine, requests in sides.values():
        warm_up(engine, requests)
    masked = ("constrained", "constrained_fixed_length")
    before = {k: (sides[k][0].stats.decode_steps, copy.copy(sides[k][0].grammars.stats))
              for k in masked}

    order = list(sides)
    times: dict[str, list[float]] = {k: [] for k in sides}
    done: dict[str, list] = {}
    for r in range(rounds):
        for side in order[r % len(order):] + order[:r % len(order)]:
            engine, requests = sides[side]
            done[side], seconds = timed_generate(engine, requests)
            times[side].append(seconds)

    made = {k: sum(c.generated_tokens for c in v) for k, v in done.items()}
    tps = {k: made[k] / min(times[k]) for k in sides}
    per_row = {k: made[k] / len(prompts) for k in sides}
    path = sides["constrained"][0].path
    common = {"model": name, "rows": len(prompts), "max_new_tokens": new_tokens,
              "temperature": TEMPERATURE, "slots": slots, "rounds": rounds, "path": path}
    check = Draft202012Validator(QA_SCHEMA)
    for side in sides:
        extra = {"ignore_eos": side.endswith("fixed_length")}
        if side == "constrained":
            rows = done[side]
            extra |= {"schema": "qa", "stopped": sum(c.finish_reason == "stop" for c in rows),
                      "truncated": sum(c.truncated for c in rows),
                      "valid": sum(_valid(c.text, check) for c in rows)}
        elif side == "constrained_fixed_length":
            extra |= {"schema": "cards (at least 8: open for all max_new_tokens)",
                      "still_open": sum(c.truncated for c in done[side])}
        elif side == "logprobs_fixed_length":
            extra |= {"logprobs": LOGPROBS, "same_tokens_as_plain": sum(
                a.token_ids == b.token_ids
                for a, b in zip(done[side], done["unconstrained_fixed_length"]))}
        emit(bench="structured_throughput", variant=side, tokens_per_s=round(tps[side], 1),
             generated_tokens=made[side], mean_tokens_per_row=round(per_row[side], 1),
             seconds=[round(t, 2) for t in times[side]], **extra, **common)

    ratio = tps["constrained"] / tps["unconstrained"]
    emit(bench="structured_ratio", model=name, path=path,
         constrained_tokens_per_s=round(tps["constrained"], 1),
         unconstrained_tokens_per_s=round(tps["unconstrained"], 1),
         constrained_over_unconstrained=round(ratio, 3),
         constrained_mean_tokens_per_row=round(per_row["constrained"], 1),
         unconstrained_mean_tokens_per_row=round(per_row["unconstrained"], 1),
         **target_fields(ratio, 0.8),
         note="EOS honoured: each side's rows end where they end, so the row lengths (and how "
              "many tokens one prefill buys) differ between the sides")
    equal = tps["constrained_fixed_length"] / tps["unconstrained_fixed_length"]
    emit(bench="structured_equal_work_ratio", model=name, path=path,
         constrained_tokens_per_s=round(tps["constrained_fixed_length"], 1),
         unconstrained_tokens_per_s=round(tps["unconstrained_fixed_length"], 1),
         constrained_over_unconstrained=round(equal, 3), tokens_per_row=new_tokens,
         **target_fields(equal, 0.8),
         note="EOS ignored, the constrained object still open at the last token: the same rows, "
              "steps and prefill on both sides, so the ratio is constraining's own per-token "
              "cost (masks, applying them, reading each token back at once)")

    masks = {}
    for side in masked:
        engine = sides[side][0]
        steps0, g0 = before[side]
        g = engine.grammars.stats
        mask_s, n = g.mask_seconds - g0.mask_seconds, g.masks - g0.masks
        steps = engine.stats.decode_steps - steps0
        masks[side] = (1e3 * mask_s / steps if steps else None, 1e3 * mask_s / n if n else None)
        emit(bench="mask_cost", model=name, variant=side, vocab=engine.grammars.vocab_size,
             ms_per_step=rounded(masks[side][0]), ms_per_row_step=rounded(masks[side][1], 4),
             decode_steps=steps, row_masks=n,
             share_of_run=rounded(mask_s / sum(times[side])),
             note="a step: all live rows' masks, filled in parallel by llguidance and copied to "
                  "the device; per row-step: over the row masks computed; share: of that "
                  "side's seconds (all rounds)")
    lp = tps["logprobs_fixed_length"] / tps["unconstrained_fixed_length"]
    emit(bench="logprobs_ratio", model=name, path=path, logprobs=LOGPROBS,
         logprobs_tokens_per_s=round(tps["logprobs_fixed_length"], 1),
         plain_tokens_per_s=round(tps["unconstrained_fixed_length"], 1),
         logprobs_over_plain=round(lp, 3))
    return {"ratio": ratio, "equal_work_ratio": equal, "masks": masks, "logprobs_ratio": lp,
            "tps": tps, "per_row": per_row}


def _valid(text: str | None, check) -> bool:
    try:
        return text is not None and check.is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


# -- 3. compile ----------------------------------------------------------------------------------

def bench_compile(name, tokenizer, vocab: int) -> dict:
    """Run before anything else touches this tokenizer's grammars, so the wrap is a first use."""
    import llguidance.hf  # noqa: F401 - the import is not the wrap's cost

    from batchgen.engine.masks import Grammars
    from batchgen.spec import StructuredSpec
    from batchgen.spec.constraints import constraint_for

    with Timer() as spec_t:  # the load-time check: schema -> llguidance grammar text, validated
        constraints = {k: constraint_for(StructuredSpec(json_schema=s))
                       for k, s in COMPILE_SCHEMAS.items()}
    with Timer() as wrap:
        grammars = Grammars(tokenizer, vocab, tokenizer.eos_token_id)
    each = {}
    for key, c in constraints.items():
        before = grammars.stats.compile_seconds
        grammars.matcher(c)
        each[key] = round(1e3 * (grammars.stats.compile_seconds - before), 3)
    s = grammars.stats
    per = 1e3 * s.compile_seconds / s.compiles
    emit(bench="compile_cost", model=name, vocab=vocab, schemas=s.compiles,
         ms_per_schema=round(per, 3), ms_by_schema=each,
         tokenizer_wrap_ms=round(1e3 * wrap.seconds, 1),
         spec_check_ms_per_schema=round(1e3 * spec_t.seconds / len(constraints), 3),
         note="compile: LLMatcher built from the grammar, once per distinct schema per replica; "
              "tokenizer wrap: llguidance.hf.from_tokenizer, once per replica; spec check: "
              "schema to grammar text and validation, at spec load")
    return {"compile_ms": per, "wrap_ms": 1e3 * wrap.seconds}


# -- 5. scoring vs prefill -----------------------------------------------------------------------

ANSWER = ("{\"question\": \"What do %s need to thrive?\", \"answer\": \"Mostly time, patience and "
          "a steady supply of whatever the season brings, along with a little luck.\"}")


def bench_scoring(name, model, tokenizer, prompts, rounds, slots) -> dict:
    from batchgen.engine.engine import Request, ScoreRequest
    from batchgen.spec import GenerationSpec

    model.eval()
    pairs = []
    for i, p in enumerate(prompts):
        ids = tokenizer(ANSWER % TOPICS[i % len(TOPICS)], add_special_tokens=False)["input_ids"]
        if len(ids) < SCORE_COMPLETION:
            ids = (ids * SCORE_COMPLETION)[:SCORE_COMPLETION]
        pairs.append((p, tuple(ids[:SCORE_COMPLETION])))
    scored = [ScoreRequest(p, c) for p, c in pairs]
    prefill = [Request(p + c, 200 + i) for i, (p, c) in enumerate(pairs)]  # the same tokens
    tokens = sum(len(p) + len(c) for p, c in pairs)
    gen = GenerationSpec(max_new_tokens=1, temperature=TEMPERATURE)
    engine = make_engine(model, tokenizer, gen, slots, max_batch_tokens=32768)
    log(f"{name} scoring: {len(pairs)} pairs, {tokens} tokens, {rounds} round(s)")
    engine.score(scored[:2])
    timed_generate(engine, prefill[:2])
    times: dict[str, list[float]] = {"score": [], "prefill": []}
    for r in range(rounds):
        for side in (("score", "prefill") if r % 2 == 0 else ("prefill", "score")):
            with Timer() as t:
                if side == "score":
                    out = engine.score(scored)
                    assert all(s.logprobs is not None for s in out), [s.error for s in out]
                else:
                    timed_generate(engine, prefill)
            times[side].append(t.seconds)
    tps = {k: tokens / min(v) for k, v in times.items()}
    ratio = tps["score"] / tps["prefill"]
    emit(bench="scoring_vs_prefill", model=name, path=engine.path, pairs=len(pairs),
         completion_tokens=SCORE_COMPLETION, tokens=tokens,
         score_tokens_per_s=round(tps["score"], 1), prefill_tokens_per_s=round(tps["prefill"], 1),
         score_over_prefill=round(ratio, 3),
         seconds={k: [round(t, 3) for t in v] for k, v in times.items()}, rounds=rounds,
         note="both sides: prompt+completion tokens per second over the same sequences; prefill: "
              "a generation with max_new_tokens=1 whose prompts are those sequences")
    return {"ratio": ratio, "tps": tps}


# -- the run -------------------------------------------------------------------------------------

def run_model(name, model, tokenizer, *, prompts, rounds, slots, score_pairs, new_tokens) -> dict:
    with Timer() as t:
        out = {"compile": bench_compile(name, tokenizer,
                                        model.get_output_embeddings().weight.shape[0])}
        out["throughput"] = bench_throughput(name, model, tokenizer,
                                             json_prompts(tokenizer, prompts), rounds, slots,
                                             new_tokens)
        out["scoring"] = bench_scoring(name, model, tokenizer,
                                       json_prompts(tokenizer, score_pairs), rounds, slots)
    log(f"{name}: {t.seconds:.1f}s")
    return out


def summary(results: dict) -> None:
    """One table on stderr, one record on stdout. Masks: the fixed-length side's (a live
    grammar at every step)."""
    log("summary")
    log(f"{'model':<19}{'constr tok/s':>13}{'plain tok/s':>12}{'ratio':>7}{'tok/row c/u':>13}"
        f"{'equal-work':>11}{'mask ms/step':>13}{'/row-step':>10}{'compile ms':>11}"
        f"{'wrap ms':>9}{'logprobs x':>11}{'score/prefill':>14}")
    for name, r in results.items():
        th, c = r["throughput"], r["compile"]
        step, row = th["masks"]["constrained_fixed_length"]
        log(f"{name:<19}{th['tps']['constrained']:>13.1f}{th['tps']['unconstrained']:>12.1f}"
            f"{th['ratio']:>7.2f}"
            f"{th['per_row']['constrained']:>7.1f}/{th['per_row']['unconstrained']:<5.1f}"
            f"{th['equal_work_ratio']:>11.2f}{step or 0:>13.3f}{row or 0:>10.4f}"
            f"{c['compile_ms']:>11.2f}{c['wrap_ms']:>9.1f}{th['logprobs_ratio']:>11.2f}"
            f"{r['scoring']['ratio']:>14.2f}")
    records = {}
    for name, r in results.items():
        th = r["throughput"]
        step, row = th["masks"]["constrained_fixed_length"]
        records[name] = {
            "constrained_over_unconstrained": round(th["ratio"], 3),
            "met_0_8": th["ratio"] >= 0.8,
            "equal_work_constrained_over_unconstrained": round(th["equal_work_ratio"], 3),
            "mask_ms_per_step": rounded(step), "mask_ms_per_row_step": rounded(row, 4),
            "compile_ms_per_schema": round(r["compile"]["compile_ms"], 3),
            "tokenizer_wrap_ms": round(r["compile"]["wrap_ms"], 1),
            "logprobs_over_plain": round(th["logprobs_ratio"], 3),
            "score_over_prefill": round(r["scoring"]["ratio"], 3)}
    emit(bench="structured_summary", **records)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer prompts, one round (< 1 min)")
    ap.add_argument("--only", choices=["tiny", "gpt2"], help="one model (default: both)")
    args = ap.parse_args()
    quick = args.quick
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    from batchgen.engine.loading import load_tokenizer
    from batchgen.spec import ModelSpec

    pressure_start = cpu_pressure()
    results = {}
    with Timer() as total:
        if args.only in (None, "tiny"):
            path = tiny_model()
            tok = load_tokenizer(ModelSpec(path=str(path)))
            tiny = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            results["tiny"] = run_model("tiny", tiny, tok, prompts=8 if quick else 32,
                                        rounds=1 if quick else 3, slots=32,
                                        score_pairs=16 if quick else 64, new_tokens=MAX_NEW)
        if args.only in (None, "gpt2"):
            tok = load_tokenizer(ModelSpec(path=str(gpt2ish_tokenizer())))
            gpt2 = gpt2_small_random(tok)
            results["gpt2-small-shaped"] = run_model(
                "gpt2-small-shaped", gpt2, tok, prompts=4 if quick else 32,
                rounds=1 if quick else 2, slots=32, score_pairs=4 if quick else 32,
                new_tokens=24 if quick else MAX_NEW)
    summary(results)
    environment(pressure_start, seconds=round(total.seconds, 1), tokenizer_cache=str(GPT2ISH))


if __name__ == "__main__":
    main()
