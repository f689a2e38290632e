"""Constrained decoding (batchgen.spec.constraints, batchgen.engine.masks) against real llguidance and the tiny model's tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import jsonschema
import pytest
import torch

from batchgen.engine.masks import Grammars, Matchers, apply_bitmask
from batchgen.spec.constraints import Constraint, ConstraintError, check_spec, constraint_for
from batchgen.spec.tools import check_tools

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ("yes", "no", "not sure", 'say "hi"\\', "café")
LARK = r"""
start: expr
expr: NUMBER | "(" expr OP expr ")"
OP: "+" | "*"
NUMBER: /[0-9]{1,3}/
"""
TOOLS = check_tools(({"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}},
    {"name": "now", "parameters": {"type": "object", "properties": {},
                                   "additionalProperties": False}}), "input.tools")
CALL = {"anyOf": [{"type": "object", "properties": {"name": {"const": "get_weather"},
                                                   "arguments": TOOLS[0]["function"]["parameters"]},
                   "required": ["name", "arguments"]},
                  {"type": "object", "properties": {"name": {"const": "now"},
                                                   "arguments": TOOLS[1]["function"]["parameters"]},
                   "required": ["name", "arguments"]}]}


def spec(**given) -> SimpleNamespace:
    """A StructuredSpec's fields (defaults as there), without going through the spec loader."""
    fields = dict(json_schema=None, json_object=False, regex=None, choice=None, grammar=None,
                  json_schema_column=None, tool_call=False)
    return SimpleNamespace(**{**fields, **given})


def json_valid(schema):
    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return valid


# (spec, a valid output, whether an output is valid)
CASES = {
    "json_schema": (spec(json_schema=SCHEMA), json.dumps({"name": "Ada", "age": 36, "tags": ["a"]}),
                    json_valid(SCHEMA)),
    "json": (spec(json_object=True), json.dumps({"x": [1, 2.5, None, True], "y": {"z": "w"}}),
             json_valid({"type": "object"})),
    "regex": (spec(regex=REGEX), "123-abc", lambda text: bool(re.fullmatch(REGEX, text))),
    "choice": (spec(choice=CHOICES), 'say "hi"\\', lambda text: text in CHOICES),
    "grammar": (spec(grammar=LARK), "(1+(22*3))", lambda text: bool(re.fullmatch(
        r"[0-9]{1,3}|\(.*[0-9)]\)", text)) and text.count("(") == text.count(")")),
    "tool_call": (spec(tool_call=True),
                  json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}),
                  json_valid(CALL)),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    # Logits wider than the tokenizer, and not a multiple of 32, as real models pad them.
    return Grammars(tokenizer, len(tokenizer) + 40, tokenizer.eos_token_id)


def allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def allowed_ids(mask: torch.Tensor, vocab: int) -> list[int]:
    return [t for t in range(vocab) if allowed(mask, t)]


@pytest.mark.parametrize("kind", CASES)
def test_a_valid_output_is_allowed_token_by_token_and_ends_only_at_the_end(kind, tokenizer,
                                                                           grammars):
    structured, text, valid = CASES[kind]
    assert valid(text)
    constraint = constraint_for(structured, TOOLS)
    assert constraint.kind == kind
    row = grammars.matcher(constraint)
    mask = torch.empty(grammars.words, dtype=torch.int32)
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n, token in enumerate(ids):
        row.fill(mask)
        assert allowed(mask, token), (kind, tokenizer.decode([token]))
        so_far = tokenizer.decode(ids[:n])
        # EOS exactly where the output so far is complete ("123-ab" is, "(1+(2" is not).
        assert allowed(mask, eos) == row.accepting == valid(so_far), (kind, so_far)
        row.advance(token)
        assert row.error is None
    row.fill(mask)
    assert row.accepting and allowed(mask, eos)
    assert not any(allowed(mask, t) for t in range(len(tokenizer), grammars.vocab_size))


@pytest.mark.parametrize("kind", CASES)
def test_an_invalid_token_is_masked_and_rejected(kind, tokenizer, grammars):
    structured, _, _ = CASES[kind]
    row = grammars.matcher(constraint_for(structured, TOOLS))
    mask = torch.empty(grammars.words, dtype=torch.int32)
    row.fill(mask)
    bad = tokenizer.encode("!", add_special_tokens=False)[0]
    assert not allowed(mask, bad)
    assert not allowed(mask, tokenizer.convert_tokens_to_ids("<|user|>"))  # special tokens too
    row.advance(bad)
    assert row.error and not row.accepting
    row.fill(mask)  # after an error only EOS: the row ends
    assert allowed_ids(mask, grammars.vocab_size) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("kind", CASES)
def test_greedy_decoding_over_random_logits_gives_valid_text_or_is_truncated(kind, tokenizer,
                                                                             grammars):
    structured, _, valid = CASES[kind]
    constraint = constraint_for(structured, TOOLS)
    batch, steps, eos = 6, 48, tokenizer.eos_token_id
    runs = Matchers(grammars, [constraint] * batch + [None])
    assert runs.active
    generator = torch.Generator().manual_seed(sum(map(ord, kind)))
    out: list[list[int]] = [[] for _ in range(batch + 1)]
    done = [False] * (batch + 1)
    for _ in range(steps):
        live = [i for i in range(batch + 1) if not done[i]]
        if not live:
            break
        mask = runs.bitmask(live + [None], "cpu")  # a padding row too
        assert mask.shape == (len(live) + 1, grammars.words) and bool((mask[-1] == -1).all())
        logits = torch.randn(len(live) + 1, grammars.vocab_size, generator=generator)
        logits[:, eos] -= 3.0  # some length before ending, but not forever
        picks = apply_bitmask(logits, mask).argmax(-1).tolist()
        for i, token in zip(live, picks):
            runs.advance(i, token)
            if token == eos:
                done[i] = True
            else:
                out[i].append(token)
    assert not runs.truncated(batch)  # the unconstrained request
    finished = 0
    for i in range(batch):
        assert runs.error(i) is None
        if done[i]:
            assert not runs.truncated(i)
            assert valid(tokenizer.decode(out[i])), tokenizer.decode(out[i])
            finished += 1
        else:  # cut by the step limit: truncated unless what it has is already complete
            assert runs.truncated(i) == (not valid(tokenizer.decode(out[i])))
    assert finished, f"{kind}: no row finished in {steps} steps"


def test_a_constraint_is_compiled_once_per_replica(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    a = constraint_for(spec(json_schema=dict(SCHEMA)))
    b = constraint_for(spec(json_schema=json.loads(json.dumps(SCHEMA))))
    assert a == b and hash(a) == hash(b)
    Matchers(grammars, [a, b, None, a])
    grammars.matcher(b)
    assert grammars.stats.compiles == 1 and grammars.stats.compile_seconds > 0
    grammars.matcher(constraint_for(spec(regex=REGEX)))
    assert grammars.stats.compiles == 2


def test_property_order_is_kept_it_is_the_generation_order():
    first = constraint_for(spec(json_schema={"type": "object", "properties": {
        "reasoning": {"type": "string"}, "answer": {"type": "string"}}}))
    second = constraint_for(spec(json_schema={"type": "object", "properties": {
        "answer": {"type": "string"}, "reasoning": {"type": "string"}}}))
    assert first != second


def test_json_is_written_as_json_dumps_writes_it_without_free_whitespace(tokenizer, grammars):
    constraint = constraint_for(spec(json_object=True))
    mask = torch.empty(grammars.words, dtype=torch.int32)
    for prefix, starts in (('{"a"', ":"), ('{"a":', " "), ('{"a": 1', ",}0123456789.eE")):
        row = grammars.matcher(constraint)
        for token in tokenizer.encode(prefix, add_special_tokens=False):
            row.advance(token)
        row.fill(mask)
        texts = [tokenizer.decode([t]) for t in allowed_ids(mask, grammars.vocab_size)]
        assert texts and all(t[0] in starts and not t[1:2].isspace() for t in texts), (prefix, texts)


def assert_constrained_from_here(runs, grammars, constraint, tokenizer, answer):
    """Row 0's mask is a fresh matcher's, and ``answer`` completes it without error."""
    fresh = torch.empty(grammars.words, dtype=torch.int32)
    grammars.matcher(constraint).fill(fresh)
    assert torch.equal(runs.bitmask([0], "cpu")[0], fresh)
    for token in tokenizer.encode(answer, add_special_tokens=False):
        runs.advance(0, token)
    assert not runs.truncated(0) and runs.error(0) is None


def test_the_gate_leaves_thinking_free_and_constrains_after_it(tokenizer, grammars):
    gate = tuple(tokenizer.encode("</think>", add_special_tokens=False))
    constraint = constraint_for(spec(choice=("yes", "no")))
    runs = Matchers(grammars, [constraint], gate="</think>")
    thinking = tokenizer.encode("hmm <think> 2+2 </thin", add_special_tokens=False)
    for token in thinking + list(gate[:-1]):
        assert bool((runs.bitmask([0], "cpu") == -1).all())
        runs.advance(0, token)
        assert runs.truncated(0)
    runs.advance(0, gate[-1])
    assert_constrained_from_here(runs, grammars, constraint, tokenizer, "no")


def test_a_prompt_that_closed_the_thinking_opens_the_gate(tokenizer, grammars):
    """Qwen 3 with enable_thinking: false: the chat template ends the prompt with
    ``</think>\\n\\n``; the constraint is on from the first token (it never opened)."""
    constraint = constraint_for(spec(choice=("yes", "no")))
    prompt = tuple(tokenizer.encode("<|assistant|>\n<think>\n\n</think>\n\n",
                                    add_special_tokens=False))
    runs = Matchers(grammars, [constraint], gate="</think>", prompts=[prompt])
    assert_constrained_from_here(runs, grammars, constraint, tokenizer, "yes")


def test_a_marker_written_in_other_tokens_opens_the_gate(tokenizer, grammars):
    """The model may write the marker as other tokens than its canonical ones (character by
    character here); ``split_reasoning`` splits the text there, so the constraint starts there,
    and what the marker's last token carries after it goes to the constraint."""
    constraint = constraint_for(spec(choice=("yes", "no")))
    canonical = tokenizer.encode("</think>", add_special_tokens=False)
    pieces = [t for c in "</think>" for t in tokenizer.encode(c, add_special_tokens=False)]
    assert pieces != canonical
    runs = Matchers(grammars, [constraint], gate="</think>")
    for token in tokenizer.encode("so 2+2 is", add_special_tokens=False) + pieces:
        assert runs.truncated(0)
        runs.advance(0, token)
    assert_constrained_from_here(runs, grammars, constraint, tokenizer, "no")


@pytest.mark.parametrize("vocab", [40, 64, 70, 100])
def test_apply_bitmask_any_width(vocab):
    words = 2  # 64 tokens
    bitmask = torch.zeros(2, words, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3
    bitmask[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    bitmask[1] = -1
    logits = torch.randn(2, vocab)
    masked = apply_bitmask(logits, bitmask)
    assert masked is not logits and not torch.isinf(logits).any()
    kept = [[t for t in range(vocab) if masked[r, t] != float("-inf")] for r in range(2)]
    assert kept[0] == [t for t in (3, 63) if t < vocab]
    assert kept[1] == list(range(min(vocab, 64)))
    assert torch.equal(masked[1, :64], logits[1, :64])


@pytest.mark.parametrize("given, message", [
    (spec(json_schema={"type": "nope"}), "json_schema: not a valid JSON Schema"),
    (spec(json_schema={"type": "string", "format": "nonsense"}), "json_schema: JSON Schema not "
                                                                  "supported"),
    (spec(regex="("), "regex: invalid regular expression: .*unclosed group"),
    (spec(grammar="start: foo"), 'grammar: invalid Lark grammar: .*unknown name: "foo"'),
    (spec(grammar="start: ("), "grammar: invalid Lark grammar"),
])
def test_bad_constraints_are_refused_naming_the_key(given, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_spec(given)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConstraintError, match=message):
        constraint_for(given)


def test_good_constraints_pass_the_spec_check():
    for structured, _, _ in CASES.values():
        check_spec(structured)
    check_spec(spec(json_schema_column="schema"))


def test_the_spec_loader_runs_the_check():
    from pydantic import ValidationError

    from batchgen.spec import StructuredSpec

    with pytest.raises(ValidationError, match="regex: invalid regular expression"):
        StructuredSpec.model_validate({"regex": "("})
    assert constraint_for(StructuredSpec.model_validate({"json": True})).kind == "json"


@pytest.mark.parametrize("value, message", [
    (None, "column 'schema': null"),
    ("{not json", "column 'schema': not JSON"),
    ('{"type": "nope"}', "column 'schema': not a valid JSON Schema"),
    ("[1, 2]", "column 'schema': not a valid JSON Schema: expected a mapping"),
])
def test_a_bad_per_row_schema_is_that_rows_error(value, message):
    with pytest.raises(ConstraintError, match=message):
        constraint_for(spec(json_schema_column="schema"), row={"schema": value})


def test_per_row_schemas_from_text_or_struct(tokenizer, grammars):
    structured = spec(json_schema_column="schema")
    text = constraint_for(structured, row={"schema": json.dumps(SCHEMA)})
    # A struct column: fields other rows have come back as None.
    struct = constraint_for(structured, row={"schema": {**SCHEMA, "enum": None}})
    assert text == struct == constraint_for(spec(json_schema=SCHEMA))
    assert text.kind == "json_schema"


def test_tool_call_needs_tools():
    with pytest.raises(ConstraintError, match="tool_call"):
        constraint_for(spec(tool_call=True), tools=())


def test_the_spec_check_imports_no_torch():
    code = ("import sys; from batchgen.spec.constraints import check_spec; from types import "
            "SimpleNamespace as N; check_spec(N(json_schema={'type': 'object'}, json_object=False, "
            "regex=None, choice=None, grammar=None, json_schema_column=None, tool_call=False)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_constraint_is_hashable_text():
    c = Constraint("regex", "x")
    assert {c: 1}[Constraint("regex", "x")] == 1


@pytest.mark.parametrize("choices", [
    ("yes", "no", "maybe", "yes please", "a.b", "c|d", "e-f", "x y", "naïve", "new\nline", "(x)",
     "[1]", "$5", "a*b", "#tag", "~t", "&", 'say "hi"\\'),
    ("The cat", "The cat sees", "The", "river", "The river remembers a red apple"),
], ids=["metacharacters", "prefixes"])
def test_a_choice_as_one_regex_masks_as_the_lark_alternation_did(choices, tokenizer):
    """The choice constraint moved from a Lark alternation of literals (which llguidance stops
    past 2000 options) to one regular expression of literals: the same language, so the same
    mask at every step, hence no text changes and no engine version bump."""
    import random

    import llguidance.hf
    from llguidance import LLMatcher

    vocab = len(tokenizer)
    words = (vocab + 31) // 32
    lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=tokenizer.eos_token_id)
    lark = LLMatcher.grammar_from_lark("start: " + " | ".join(
        json.dumps(c, ensure_ascii=False) for c in choices))
    now = constraint_for(spec(choice=choices)).grammar

    def mask(m):
        t = torch.zeros(words, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(t.data_ptr(), 4 * words)
        return t

    rng = random.Random(0)
    texts = set()
    for _ in range(40):
        a, b = LLMatcher(lt, lark), LLMatcher(lt, now)
        ids = []
        while True:
            ma, mb = mask(a), mask(b)
            assert torch.equal(ma, mb), tokenizer.decode(ids)
            token = rng.choice(allowed_ids(ma, vocab))
            if token == tokenizer.eos_token_id:
                break
            a.consume_token(token)
            b.consume_token(token)
            ids.append(token)
        texts.add(tokenizer.decode(ids))
    assert texts <= set(choices) and len(texts) > 1


def test_a_tools_refs_move_with_its_parameters_and_nothing_else_does():
    from batchgen.spec.tools import call_schema

    params = {"type": "object", "properties": {
        "city": {"$ref": "#/$defs/city"},
        "echo": {"const": {"$ref": "#/$defs/city"}},  # data: a value to match, not a ref
        "own": {"$id": "https://example.com/own", "$ref": "#/$defs/x",
                "$defs": {"x": {"type": "integer"}}},  # resolves against its own $id
        "again": {"$ref": "#"}},
        "$defs": {"city": {"enum": ["Paris", "Rome"]}}}
    tools = check_tools(({"name": "a", "parameters": params}, {"name": "b"}), "input.tools")
    call = call_schema(tools)
    moved = call["anyOf"][0]["properties"]["arguments"]["properties"]
    assert moved["city"] == {"$ref": "#/anyOf/0/properties/arguments/$defs/city"}
    assert moved["again"] == {"$ref": "#/anyOf/0/properties/arguments"}
    assert moved["echo"] == params["properties"]["echo"]
    assert moved["own"] == params["properties"]["own"]
    valid = jsonschema.Draft202012Validator(call)
    assert valid.is_valid({"name": "a", "arguments": {"city": "Rome", "echo": {"$ref": "#/$defs/city"}}})
    assert not valid.is_valid({"name": "a", "arguments": {"city": "Oslo"}})
    assert constraint_for(spec(tool_call=True), tools).kind == "tool_call"
