"""Structured generation end to end through a shard (no Ray): every constraint kind on the tiny
model, per-row schemas, truncation mid-object, logprobs and scores in the output, reasoning
split off before the constraint, tool calls, and the bad inputs. The engine-level pieces are
in test_structured.py (masks), test_logprobs.py (logprobs and scores) and test_chat.py."""

import json
import math
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import spec_dict

from batchgen.engine import Engine, Request
from batchgen.errors import SpecError
from batchgen.job.plan import make_plan
from batchgen.shard.worker import ShardWorker
from batchgen.spec import ModelSpec, ResourcesSpec, StructuredSpec
from batchgen.spec.constraints import constraint_for
from batchgen.spec.load import parse_spec

QA = {"type": "object", "required": ["question", "answer"], "additionalProperties": False,
      "properties": {"question": {"type": "string", "minLength": 1, "maxLength": 40},
                     "answer": {"type": "string", "minLength": 1, "maxLength": 40}}}
TOPICS = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    from batchgen.spec import GenerationSpec

    return Engine.load(ModelSpec(path=tiny_model), GenerationSpec(), ResourcesSpec(batch_size=8))


def table(n=8, **extra) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)],
                     "prompt": [f"Write one question about {TOPICS[i % 8]} as JSON." for i in range(n)],
                     "topic": [TOPICS[i % 8] for i in range(n)], **extra})


def run_job(tmp_path, engine, data: pa.Table, **sections):
    """One shard of a job over ``data`` on the shared engine; the output rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.parquet"
    pq.write_table(data, src)
    mode = sections.pop("mode", "generate")
    raw = spec_dict(str(src), str(tmp_path / "out"), "unused", **sections)
    raw["mode"] = mode
    spec = parse_spec(raw)
    engine.gen = spec.generation
    plan = make_plan(spec)
    result = ShardWorker(spec, engine).run(plan.shards[0], "a1")
    return result, pq.read_table(tmp_path / "out" / result.staged).to_pylist()


def generate(engine, texts, structured, **gen):
    """Engine-level: constrained completions of ``texts``."""
    from batchgen.spec import GenerationSpec

    engine.gen = GenerationSpec(**{"max_new_tokens": 48, **gen})
    constraint = constraint_for(StructuredSpec.model_validate(structured))
    ids = engine.tokenize(texts)
    return engine.generate([Request(tuple(p), 100 + i, constraint) for i, p in enumerate(ids)])


# -- every kind ---------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0}], ids=["greedy", "sampled"])
def test_json_schema_rows_all_parse_and_validate(tmp_path, engine, sampling):
    result, rows = run_job(tmp_path, engine, table(8), generation={
        "max_new_tokens": 96, "structured": {"json_schema": QA}, **sampling})
    assert len(rows) == 8 and result.parse_errors == 0 and result.parsed == 8
    for r in rows:
        assert r["finish_reason"] == "stop" and r["parse_error"] is None
        jsonschema.validate(json.loads(r["generation"]), QA)
        assert json.loads(r["parsed"]) == json.loads(r["generation"])


def test_any_json_object(engine):
    for c in generate(engine, ["The cat", "Write one sentence about tea."], {"json": True},
                      max_new_tokens=64):
        assert c.truncated or isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("structured, ok", [
    ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"choice": ["yes", "no", "it depends"]}, lambda t: t in ("yes", "no", "it depends")),
    ({"grammar": 'start: "The " animal " " verb "."\nanimal: "cat" | "robot"\nverb: "sees" | "builds"'},
     lambda t: re.fullmatch(r"The (cat|robot) (sees|builds)\.", t)),
], ids=["regex", "choice", "grammar"])
@pytest.mark.parametrize("path", ["slots", "hf"])
def test_each_kind_gives_only_what_it_allows(tiny_model, engine, structured, ok, path):
    if path == "hf":
        from batchgen.spec import GenerationSpec

        engine = Engine.load(ModelSpec(path=tiny_model), GenerationSpec(), ResourcesSpec())
        engine.path = "hf"
    for c in generate(engine, ["The cat", "Write one sentence about tea.", "x"] * 2, structured,
                      temperature=1.0):
        assert c.finish_reason == "stop" and not c.truncated and ok(c.text), c.text


def test_a_constrained_rows_output_does_not_depend_on_its_batch(engine):
    texts = [f"Write one question about {t} as JSON." for t in TOPICS]
    together = generate(engine, texts, {"json_schema": QA}, temperature=0.9, max_new_tokens=64)
    for i, text in enumerate(texts):
        engine.gen = engine.gen
        ids = engine.tokenize([text])[0]
        alone = engine.generate([Request(tuple(ids), 100 + i, together_constraint())])[0]
        assert alone.token_ids == together[i].token_ids


def together_constraint():
    return constraint_for(StructuredSpec(json_schema=QA))


def test_the_constraint_is_compiled_once_per_replica(engine):
    generate(engine, ["The cat"] * 4, {"json_schema": QA})
    compiles = engine.grammars.stats.compiles
    generate(engine, ["A robot"] * 4, {"json_schema": QA})
    assert engine.grammars.stats.compiles == compiles


# -- per-row schemas, truncation ----------------------------------------------------------


def test_per_row_schemas_and_a_bad_one_is_that_rows_error(tmp_path, engine):
    schemas = [json.dumps({"type": "object", "required": [f"k{i}"], "additionalProperties": False,
                           "properties": {f"k{i}": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}}}) for i in range(6)]
    schemas[2] = '{"type": "nope"}'
    schemas[4] = "not json"
    schemas.append('{"type": "number", "maximum": NaN}')  # llguidance refuses it: a row error
    result, rows = run_job(tmp_path, engine, table(7, schema=schemas), generation={
        "max_new_tokens": 32, "structured": {"json_schema_column": "schema"}})
    by_id = {r["row_id"]: r for r in rows}
    assert result.errors == 3 and "column 'schema'" in by_id["r6"]["error"]
    assert by_id["r2"]["finish_reason"] == "error" and "column 'schema'" in by_id["r2"]["error"]
    assert "column 'schema'" in by_id["r4"]["error"]
    for i in (0, 1, 3, 5):
        value = json.loads(by_id[f"r{i}"]["generation"])
        assert list(value) == [f"k{i}"] and isinstance(value[f"k{i}"], int)


def test_truncation_mid_object_is_length_with_a_parse_error_that_says_so(tmp_path, engine):
    result, rows = run_job(tmp_path, engine, table(4), generation={
        "max_new_tokens": 5, "structured": {"json_schema": QA}})
    for r in rows:
        assert r["finish_reason"] == "length"
        assert r["parsed"] is None and r["parse_error"].startswith("truncated:")
        assert "max_new_tokens (5)" in r["parse_error"]
    assert result.parse_errors == 4


# -- logprobs, scores ---------------------------------------------------------------------


def test_logprobs_columns_and_the_score_of_the_same_text(tmp_path, engine):
    """Generate with logprobs, then score the generations as completions of the same prompts:
    each row's completion_logprob equals its cumulative_logprob."""
    _, gen_rows = run_job(tmp_path / "g", engine, table(6), generation={
        "max_new_tokens": 16, "temperature": 1.0, "logprobs": 3, "seed": 2, "ignore_eos": True})
    for r in gen_rows:
        assert len(r["logprobs"]) == r["generated_tokens"]
        assert all(len(t["top_logprobs"]) == 3 for t in r["logprobs"])
        assert r["cumulative_logprob"] == pytest.approx(sum(t["logprob"] for t in r["logprobs"]))
    # each row's tokens as text, special tokens kept; those that re-tokenize to the same tokens
    # (byte-level BPE may merge differently) are scored
    for r in gen_rows:
        r["text"] = engine.tokenizer.decode([t["token_id"] for t in r["logprobs"]])
    same = [r for r in gen_rows if engine.tokenize_continuation([r["text"]])[0]
            == [t["token_id"] for t in r["logprobs"]]]
    assert len(same) >= 3
    data = table(6).filter(pa.array([r["row_id"] in {s["row_id"] for s in same}
                                     for r in gen_rows]))
    data = data.append_column("answer", pa.array([s["text"] for s in same]))
    result, scored = run_job(tmp_path / "s", engine, data, mode="score",
                             input={"completion_column": "answer"},
                             generation={"max_new_tokens": 16, "logprobs": 1})
    for s, g in zip(scored, same):
        assert s["finish_reason"] == "scored" and s["completion"] == g["text"]
        assert s["completion_tokens"] == g["generated_tokens"]
        assert s["completion_logprob"] == pytest.approx(g["cumulative_logprob"], abs=1e-3)
        assert s["perplexity"] == pytest.approx(math.exp(-s["completion_logprob"]
                                                         / s["completion_tokens"]))
        assert [t["token_id"] for t in s["logprobs"]] == [t["token_id"] for t in g["logprobs"]]


def test_scoring_bad_completions_are_error_rows(tmp_path, engine):
    answers = ["The moon.", None, "", "word " * 40]
    result, rows = run_job(tmp_path, engine, table(4, answer=answers), mode="score",
                           input={"completion_column": "answer"},
                           generation={"max_new_tokens": 16})
    by_id = {r["row_id"]: r for r in rows}
    assert by_id["r0"]["finish_reason"] == "scored" and by_id["r0"]["completion_logprob"] < 0
    assert by_id["r1"]["error"] == "completion column 'answer' is null"
    assert by_id["r2"]["error"] == "completion column 'answer' is empty"
    assert "more than generation.max_new_tokens=16" in by_id["r3"]["error"]
    assert result.errors == 3
    assert result.scored_tokens == by_id["r0"]["completion_tokens"] > 0
    assert result.generated_tokens == 0


# -- reasoning, tools ---------------------------------------------------------------------


def test_the_constraint_starts_after_the_end_of_thinking(engine):
    """A model that 'thinks' until a marker: the text up to the marker is unconstrained (the
    same as without a constraint), the answer after it is constrained."""
    from batchgen.shard.responses import split_reasoning

    text = "<|user|>\nWrite one sentence about tea.<|end|>\n<|assistant|>\n"
    from batchgen.spec import GenerationSpec

    engine.gen = GenerationSpec(max_new_tokens=24)
    free = engine.generate([Request(tuple(engine.tokenize([text])[0]), 0)])[0]
    words = free.text.split()
    marker = " " + words[1]  # a word the model writes early anyway stands in for "</think>"
    assert marker in free.text
    [c] = generate(engine, [text], {"regex": "[0-9]{2}"}, reasoning_end=marker,
                   max_new_tokens=24)
    head = free.text[:free.text.index(marker) + len(marker)]
    assert c.text.startswith(head)
    reasoning, answer = split_reasoning(c.text, marker)
    assert re.fullmatch("[0-9]{2}", answer), c.text


def test_tool_calls_constrained_to_the_tools(tmp_path, engine):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "required": ["city", "days"],
                       "additionalProperties": False,
                       "properties": {"city": {"type": "string", "maxLength": 12},
                                      "days": {"type": "integer", "minimum": 1,
                                               "maximum": 7}}}}},
        {"name": "get_time", "parameters": {"type": "object", "required": ["zone"],
                                            "properties": {"zone": {"enum": ["utc", "cet"]}},
                                            "additionalProperties": False}}]
    messages = [[{"role": "user", "content": f"What is the weather in {t}?"}] for t in TOPICS[:6]]
    data = pa.table({"id": [f"r{i}" for i in range(6)], "messages": messages,
                     "topic": TOPICS[:6]})
    result, rows = run_job(tmp_path, engine, data, input={
        "prompt_column": None, "messages_column": "messages", "tools": tools},
        generation={"max_new_tokens": 64, "temperature": 0.8,
                    "structured": {"tool_call": True}})
    assert result.errors == 0
    for r in rows:
        assert "get_weather" in r["prompt"]  # the template showed the tools
        assert r["parse_error"] is None, r["generation"]
        [call] = r["tool_calls"]
        args = json.loads(call["arguments"])
        assert call["name"] in ("get_weather", "get_time")
        schema = tools[0]["function"]["parameters"] if call["name"] == "get_weather" \
            else tools[1]["parameters"]
        jsonschema.validate(args, schema)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("generation, input_, message", [
    ({"structured": {"json_schema": {"type": "nope"}}}, {}, "generation.structured: .*json_schema"),
    ({"structured": {"regex": "("}}, {}, "generation.structured: .*regex"),
    ({"structured": {"grammar": "start: foo"}}, {}, "generation.structured: .*grammar"),
    ({"structured": {"json": True, "regex": "a"}}, {}, "exactly one of"),
    ({"structured": {}}, {}, "exactly one of"),
    ({"structured": {"choice": []}}, {}, "choice"),
    ({"structured": {"tool_call": True}}, {}, "tool_call needs input.tools"),
    ({"logprobs": 21}, {}, "generation.logprobs"),
    ({"logprobs": -1}, {}, "generation.logprobs"),
    ({"structured": {"json": True}, "ignore_eos": True}, {}, "ignore_eos"),
    ({}, {"chat": True, "tools": [{"name": "f", "parameters": {"type": "nope"}}]},
     r"input.tools.*tools\[0\].function.parameters"),
    ({}, {"chat": True, "tools": [{"name": "bad name!"}]}, r"tools\[0\].function.name"),
    ({}, {"tools": [{"name": "f"}]}, "tools need chat"),
    ({}, {"chat": True, "chat_template_kwargs": {"tools": []}}, "batchgen sets these itself"),
    ({}, {"completion_column": "prompt"}, "completion_column needs mode: score"),
    ({"structured": {"json": True}, "stop": ["\n"]}, {}, "structured takes no stop strings"),
    ({"structured": {"tool_call": True}}, {"chat": True, "tools": [{"name": "f", "parameters": {
        "type": "object", "not": {"required": ["a"]}}}]}, "generation.structured.tool_call: .*input.tools"),
    ({"logprobs": 1}, {"columns": ["id", "logprobs"]}, "clash with output columns this job writes"),
], ids=["schema", "regex", "grammar", "two", "none", "empty-choice", "tool-call-no-tools",
        "logprobs-max", "logprobs-neg", "ignore-eos", "tool-schema", "tool-name", "tools-no-chat",
        "kwargs-clash", "completion-no-score", "stop", "tool-unsupported", "clash"])
def test_bad_specs_fail_at_load_naming_the_key(tmp_path, generation, input_, message):
    raw = spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m",
                    generation={"max_new_tokens": 8, **generation})
    raw["input"].update(input_)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_columns_named_like_output_columns_other_jobs_write_are_kept(tmp_path):
    """A job written before these columns existed, keeping an input column `completion` or
    `reasoning`, still loads: only the columns its job writes clash."""
    raw = spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m")
    raw["input"]["columns"] = ["id", "completion", "reasoning", "logprobs"]
    assert parse_spec(raw).input.columns == ("id", "completion", "reasoning", "logprobs")


def test_score_mode_needs_a_completion_column(tmp_path):
    raw = spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m")
    raw["mode"] = "score"
    with pytest.raises(SpecError, match="completion_column"):
        parse_spec(raw)
    raw["input"]["completion_column"] = "prompt"
    raw["generation"] = {"n": 2, "temperature": 1.0}
    with pytest.raises(SpecError, match="mode: score"):
        parse_spec(raw)


def test_a_grammar_this_tokenizer_cannot_serve_fails_the_replica_with_the_key(tmp_path, engine):
    """A grammar that names a special token the vocabulary lacks passes spec load (no
    tokenizer there) and is refused when the replica starts, not row by row."""
    src = tmp_path / "in.parquet"
    pq.write_table(table(2), src)
    spec = parse_spec(spec_dict(str(src), str(tmp_path / "out"), "m", generation={
        "structured": {"grammar": 'start: "hi" <|nonexistent|>'}}))
    engine.gen = spec.generation
    with pytest.raises(SpecError, match="generation.structured: grammar: .*tokenizer"):
        ShardWorker(spec, engine)


def test_the_constraint_starts_at_once_when_the_prompt_ends_the_thinking(engine):
    """A chat template that closes the thinking in the prompt (Qwen 3 with enable_thinking:
    false): the answer is constrained from its first token."""
    text = "<|user|>\nWrite one sentence about tea.<|end|>\n<|assistant|>\n<|system|>"
    [c] = generate(engine, [text], {"regex": "[0-9]{3}"}, reasoning_end="<|system|>")
    assert re.fullmatch("[0-9]{3}", c.text) and not c.truncated


def test_a_thinking_that_never_ends_is_an_incomplete_row(tmp_path, engine):
    _, rows = run_job(tmp_path, engine, table(3), input={"chat": True}, generation={
        "max_new_tokens": 24, "reasoning_end": "<|system|>", "structured": {"regex": "[0-9]{3}"}})
    for r in rows:
        assert r["finish_reason"] == "stop" and r["parse_error"].startswith("incomplete:")
        assert r["generation"] == "" and r["reasoning"]


def test_long_documents_are_reduced_under_the_constraint(tmp_path, engine):
    """With long_documents: chunk the window summaries are free and the reduce step is
    constrained, like a short row."""
    docs = ["The cat sees a red apple today. " * n for n in (2, 60, 3, 90)]
    data = pa.table({"id": [f"d{i}" for i in range(4)], "text": docs, "topic": ["t"] * 4})
    _, rows = run_job(tmp_path, engine, data, input={
        "prompt_column": None, "template": "Summarize: {{ text }}", "long_documents": "chunk",
        "chunk_column": "text", "chunk_tokens": 96, "reduce_template": "Combine: {{ summaries | join(' ') }}"},
        model={"max_input_tokens": 160},
        generation={"max_new_tokens": 12, "structured": {"choice": ["good", "bad"]}})
    assert {r["chunks"] > 0 for r in rows} == {True, False}
    for r in rows:
        assert r["generation"] in ("good", "bad") and r["parse_error"] is None


def test_a_completion_without_tokens_is_that_rows_error(tmp_path):
    from batchgen.engine import EchoEngine
    from batchgen.spec import GenerationSpec

    src = tmp_path / "in.parquet"
    pq.write_table(table(2, answer=["a real answer", "   "]), src)
    raw = spec_dict(str(src), str(tmp_path / "out"), "m", input={"completion_column": "answer"},
                    model={"engine": "echo"})
    raw["mode"] = "score"
    spec = parse_spec(raw)
    result = ShardWorker(spec, EchoEngine(GenerationSpec())).run(make_plan(spec).shards[0], "a")
    rows = pq.read_table(tmp_path / "out" / result.staged).to_pylist()
    assert rows[0]["finish_reason"] == "scored" and rows[0]["completion_tokens"] == 3
    assert rows[1]["error"] == "completion column 'answer' holds no tokens ('   ')"


def test_a_grammar_that_never_ends_is_bounded_by_max_new_tokens(engine):
    [c] = generate(engine, ["The cat"], {"regex": "(ab)+"}, max_new_tokens=12)
    assert c.finish_reason in ("length", "stop") and c.generated_tokens <= 12
    assert re.fullmatch("(ab)+", c.text)


def test_a_structured_spec_survives_job_json(tmp_path):
    """job.json holds model_dump(mode="json"); resume parses it back: `json` (a pydantic name
    clash, stored as json_object) must come back as the same spec."""
    raw = spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m",
                    generation={"structured": {"json": True}, "logprobs": 2})
    spec = parse_spec(raw)
    dumped = spec.model_dump(mode="json")
    assert dumped["generation"]["structured"]["json"] is True
    assert parse_spec(json.loads(json.dumps(dumped))) == spec


# -- what the constraint library says (issue 18, hostile input round 2) --------------------------


def test_a_choice_of_thousands_of_options_gives_whole_options(tmp_path, engine):
    # Over ~2000 options llguidance's parser stopped after the first token: every row was cut
    # after one character and the job reported no error.
    options = [f"label {i}" for i in range(2500)]
    result, rows = run_job(tmp_path, engine, table(4), generation={
        "max_new_tokens": 8, "temperature": 1.0, "structured": {"choice": options}})
    assert result.errors == 0 and result.parse_errors == 0
    assert all(r["generation"] in options and r["parsed"] == r["generation"] for r in rows)


@pytest.mark.parametrize("path", ["slots", "hf"])
def test_a_row_the_constraint_library_stops_is_an_error_row_saying_why(tmp_path, tiny_model,
                                                                        engine, path):
    # Five letters, then one of 2500 words: llguidance's parser holds one item per word and
    # stops past 2000, only once the words are reached (the spec check's first steps pass).
    words = " | ".join(json.dumps(f"w{i}") for i in range(2500))
    grammar = f'start: /[a-z]{{5}}/ " " word\nword: {words}'
    if path == "hf":
        from batchgen.spec import GenerationSpec

        engine = Engine.load(ModelSpec(path=tiny_model), GenerationSpec(), ResourcesSpec())
        engine.path = "hf"
    result, rows = run_job(tmp_path, engine, table(3), generation={
        "max_new_tokens": 16, "structured": {"grammar": grammar}})
    assert result.errors == 3, rows
    for r in rows:
        assert r["finish_reason"] == "error" and r["generation"] is None
        assert r["error"].startswith("generation.structured: llguidance stopped this row after ")
        assert "Current row has 2501 items; max is 2000" in r["error"]


NON_OBJECTS = [{"type": "string", "maxLength": 8}, {"enum": ["red", "green", 3]}, {},
               {"type": "array", "items": {"type": "integer"}, "maxItems": 3}]


@pytest.mark.parametrize("schema", NON_OBJECTS, ids=["string", "enum", "anything", "array"])
def test_a_schema_that_is_not_an_object_parses_its_valid_output(tmp_path, engine, schema):
    # The constrained output was right, then reported "no JSON object in the text".
    result, rows = run_job(tmp_path, engine, table(4), generation={
        "max_new_tokens": 24, "temperature": 1.0, "structured": {"json_schema": schema}})
    complete = [r for r in rows if r["finish_reason"] != "length"]
    assert len(complete) >= 2  # (`{}` allows values that outgrow the budget: truncated, said so)
    for r in complete:
        assert r["parse_error"] is None, (r["generation"], r["parse_error"])
        value = json.loads(r["generation"])
        jsonschema.validate(value, schema)
        assert json.loads(r["parsed"]) == value


@pytest.mark.parametrize("n_tools", [1, 2], ids=["one tool", "two tools"])
def test_a_tool_whose_parameters_use_defs_can_be_called_under_tool_call(tmp_path, engine, n_tools):
    # A valid schema with $defs/$ref was refused under tool_call ("Pointer '/$defs/city' does
    # not exist"): the call schema nests the parameters, so their refs must follow them.
    tools = [{"name": "weather", "parameters": {
        "type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"$ref": "#/$defs/city"}},
        "$defs": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}},
        {"name": "now", "parameters": {"type": "object", "properties": {},
                                       "additionalProperties": False}}]
    result, rows = run_job(tmp_path, engine, table(8),
                           input={"chat": True, "tools": tools[:n_tools]},
                           generation={"max_new_tokens": 96, "temperature": 1.0,
                                       "structured": {"tool_call": True}})
    assert result.errors == 0
    cities = []
    for r in rows:
        assert r["finish_reason"] == "stop" and r["parse_error"] is None, r
        [call] = r["tool_calls"]
        if call["name"] == "weather":
            cities.append(json.loads(call["arguments"])["city"])
    assert cities and set(cities) <= {"Paris", "Rome", "Oslo"}  # the $ref'd enum held
