"""The jobs users come for, end to end from jobs/: synthetic Q&A (JSON constrained to its schema,
n=4, on S3), corpus summarization (long documents chunked, then reduced), function-calling data
(conversations + tools) and answers ranked by score (on S3), plus what reads their output."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO, spec_dict

from batchgen.cli import main
from batchgen.errors import InputError, SpecError
from batchgen.io.storage import storage_options
from batchgen.job.driver import run_job
from batchgen.job.plan import make_plan
from batchgen.shard import postprocess, prompts
from batchgen.spec.load import load_spec, parse_spec

TOPICS = [json.loads(line) for line in (REPO / "jobs/data/qa-topics.jsonl").read_text().splitlines()]


def quiet(_line):
    pass


def example_job(name: str, monkeypatch, **overrides) -> object:
    monkeypatch.chdir(REPO)  # example jobs use paths relative to the repo root
    return load_spec(REPO / "jobs" / name, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


# -- Synthetic data ----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.s3
def test_synthetic_qa_job_on_s3(ray_local, tiny_model, s3_endpoint, s3_bucket, monkeypatch):
    import fsspec

    out = f"{s3_bucket}/qa"
    spec = example_job("synthetic-qa.yaml", monkeypatch, **{
        "model.path": tiny_model, "output.path": out, "storage.endpoint_url": s3_endpoint})
    summary = run_job(spec, live=False, log=quiet)
    assert summary.state == "completed"

    fs, root = fsspec.core.url_to_fs(out, **storage_options(out, s3_endpoint))
    rows = []
    for path in sorted(fs.ls(f"{root}/data", detail=False)):
        with fs.open(path, "rb") as f:
            rows += pq.ParquetFile(f).read().to_pylist()
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))

    # Every (topic, sample) at most once; dedupe removed only exact repeats, and counted them.
    keys = Counter((r["row_id"], r["sample_index"]) for r in rows)
    assert max(keys.values()) == 1
    assert {r for r, s in keys if s == 0} == {t["topic_id"] for t in TOPICS}
    assert len(rows) + manifest["duplicates_removed"] == len(TOPICS) * 4
    by_row = Counter(r["row_id"] for r in rows)
    for rid, count in by_row.items():
        texts = [r["generation"] for r in rows if r["row_id"] == rid]
        assert len(set(texts)) == count  # no exact duplicates left within a row

    # JSON under generation.structured: every row parses and satisfies the schema, on the tiny
    # model too; the counts agree with the manifest.
    parsed = [r for r in rows if r["parsed"] is not None]
    failed = [r for r in rows if r["parse_error"] is not None]
    assert failed == [] and len(parsed) == len(rows) >= len(TOPICS) * 4 - 4
    assert manifest["parsed"] == len(parsed) and manifest["parse_errors"] == 0
    for r in parsed:
        obj = json.loads(r["parsed"])
        jsonschema.validate(obj, spec.generation.structured.json_schema)
        assert json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False) == r["parsed"]
        assert json.loads(r["generation"]) == obj  # the whole generation is the object
    # Chat template with system prompt and the few-shot example, rendered per topic.
    first = next(r for r in rows if r["row_id"] == "q000")
    assert "<|system|>" in first["prompt"] and "Why does rain fall?" in first["prompt"]
    assert first["prompt"].rstrip().endswith("<|assistant|>")
    assert "beginner question about rivers" in first["prompt"]
    assert {r["topic"] for r in rows} == {t["topic"] for t in TOPICS}  # kept columns


# -- Structured generation: tool calls, scores -------------------------------------------------


@pytest.mark.ray
def test_tool_calls_job(ray_local, tiny_model, tmp_path, monkeypatch):
    """jobs/tool-calls.yaml: conversations + tools -> one valid call per row."""
    spec = example_job("tool-calls.yaml", monkeypatch, **{
        "model.path": tiny_model, "output.path": str(tmp_path / "calls")})
    assert run_job(spec, live=False, log=quiet).state == "completed"
    rows = pq.read_table(tmp_path / "calls" / "data").to_pylist()
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in spec.input.tools}
    assert len(rows) == 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for r in rows:
        # the whole prompt, tools block included, fits the tiny model's input budget
        assert r["prompt_tokens"] == len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        assert r["finish_reason"] == "stop" and r["parse_error"] is None, r["generation"]
        [call] = r["tool_calls"]
        jsonschema.validate(json.loads(call["arguments"]), tools[call["name"]])
        assert "search_books" in r["prompt"]  # the chat template showed the tools
    multi = next(r for r in rows if len(r["messages"]) == 3)
    assert "Hello! How can I help?" in multi["prompt"]


@pytest.mark.ray
@pytest.mark.s3
def test_scoring_job_on_s3_ranks_the_fluent_answer_first(ray_local, tiny_model, s3_endpoint,
                                                          s3_bucket, monkeypatch):
    """jobs/score-answers.yaml on the S3 server: every candidate scored; the answer written in
    the tiny model's own style ranks first for every question."""
    import fsspec

    out = f"{s3_bucket}/scores"
    spec = example_job("score-answers.yaml", monkeypatch, **{
        "model.path": tiny_model, "output.path": out, "storage.endpoint_url": s3_endpoint})
    summary = run_job(spec, live=False, log=quiet)
    assert summary.state == "completed"
    fs, root = fsspec.core.url_to_fs(out, **storage_options(out, s3_endpoint))
    rows = []
    for path in sorted(fs.ls(f"{root}/data", detail=False)):
        with fs.open(path, "rb") as f:
            rows += pq.ParquetFile(f).read().to_pylist()
    assert len(rows) == 24 and all(r["finish_reason"] == "scored" for r in rows)
    by_question: dict = {}
    for r in rows:
        assert len(r["logprobs"]) == r["completion_tokens"] > 0
        assert r["completion_logprob"] == pytest.approx(sum(t["logprob"] for t in r["logprobs"]))
        by_question.setdefault(r["question_id"], []).append(r)
    for answers in by_question.values():
        best = max(answers, key=lambda r: r["completion_logprob"])
        assert best["kind"] == "fluent"
    # The summary line counts the tokens scored (it said "0 tokens": none are generated).
    scored = sum(r["completion_tokens"] for r in rows)
    assert summary.scored_tokens == scored and summary.generated_tokens == 0
    assert summary.line().startswith(f"completed: 24 rows, 24 outputs (0 errors), {scored} tokens "
                                     "scored in ")


def test_json_parsing_and_schema():
    schema = {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}}
    assert postprocess.parse_generation('ok {"q": "why", "n": 1} done', schema) == (
        '{"n":1,"q":"why"}', None)
    assert postprocess.parse_generation('{"q": 3}', schema) == (None, "schema: q: 3 is not of type 'string'")
    assert postprocess.parse_generation("{oops} then {\"q\": \"x\"}", schema)[0] == '{"q":"x"}'
    assert postprocess.parse_generation("[1, 2]", None) == (None, "no JSON object in the text")
    assert postprocess.parse_generation('{"q": ', None)[1].startswith("invalid JSON")
    assert postprocess.duplicate_samples(["a", "a", "a", "b"], ["x", "x", "y", "x"],
                                         [False] * 4) == {1}


def test_bad_json_schema_is_a_spec_error(tmp_path):
    raw = spec_dict("in", "out", "m", output={"parse": "json", "json_schema": {"type": "nope"}})
    with pytest.raises(SpecError, match="output: json_schema is not a valid JSON Schema: .nope. is not valid"):
        parse_spec(raw)
    raw = spec_dict("in", "out", "m", output={"json_schema": {"type": "object"}})
    with pytest.raises(SpecError, match="json_schema needs parse: json"):
        parse_spec(raw)


HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{{ topic|attr('__class__') }}",
    "{{ self._TemplateReference__context }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_are_refused_before_any_work(template, tmp_path, prompts_dir, tiny_model):
    raw = spec_dict(str(prompts_dir), str(tmp_path / "out"), tiny_model,
                    input={"prompt_column": None, "template": template})
    job = tmp_path / "job.json"
    job.write_text(json.dumps(raw))
    r = CliRunner().invoke(main, ["run", str(job)])
    assert r.exit_code == 2 and "input.template: refused by the sandbox" in r.output, r.output
    assert not (tmp_path / "out" / "plan.json").exists()


def test_runtime_sandbox_still_guards_what_static_checks_miss(tmp_path):
    spec = parse_spec(spec_dict("in", "out", "m", input={
        "prompt_column": None, "template": "{{ (topic|attr(name)) }}"}))
    with pytest.raises(prompts.RowError, match="sandbox|template error"):
        prompts.render(spec.input, {"topic": "tea", "name": "__class__"})


def test_few_shot_examples_without_chat_are_text_blocks():
    spec = parse_spec(spec_dict("in", "out", "m", input={
        "examples": [{"user": "Q: 1+1? A:", "assistant": " 2"}]}))
    assert prompts.with_examples(spec.input, "Q: 2+2? A:") == "Q: 1+1? A: 2\n\nQ: 2+2? A:"


# -- JSON Lines seed datasets ------------------------------------------------------------------


def test_jsonl_input_is_planned_into_shards(tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    for i in range(2):
        (seed / f"part-{i}.jsonl").write_text("".join(
            json.dumps({"id": f"s{i}{j:02d}", "prompt": f"The {j}"}) + "\n" for j in range(25)))
    (seed / "notes.json").write_text("{}")  # not picked up from a directory
    spec = parse_spec(spec_dict(str(seed), str(tmp_path / "out"), "m",
                                input={"columns": ["id"]}, resources={"shard_rows": 10}))
    plan = make_plan(spec)
    assert plan.total_rows == 50 and len(plan.shards) == 6
    assert [s.row_count for s in plan.shards] == [10, 10, 5, 10, 10, 5]
    from batchgen.io.inputs import read_rows

    rows = read_rows(plan.shards[1].file, 10, 10, ["id", "prompt"], {}).to_pylist()
    assert rows[0] == {"id": "s010", "prompt": "The 10"} and len(rows) == 10

    (seed / "part-1.jsonl").write_text('{"id": "x", "prompt": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="part-1.jsonl: not a readable JSON Lines file"):
        make_plan(spec)


# -- Corpus summarization ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def summaries(ray_local, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("summaries") / "out"
    mp = pytest.MonkeyPatch()
    try:
        spec = example_job("summarize-corpus.yaml", mp, **{
            "model.path": tiny_model, "output.path": str(out)})
        summary = run_job(spec, live=False, log=quiet)
    finally:
        mp.undo()
    assert summary.state == "completed"
    return out


@pytest.mark.ray
def test_summarize_corpus_one_summary_per_document(summaries):
    import pyarrow.dataset as ds

    corpus = pq.read_table(REPO / "jobs/data/corpus.parquet").to_pylist()
    rows = ds.dataset(summaries / "data").to_table().to_pylist()
    assert sorted(r["row_id"] for r in rows) == sorted(d["doc_id"] for d in corpus)  # exactly once
    assert all(r["sample_index"] == 0 and r["finish_reason"] != "error" for r in rows)
    chunks = ds.dataset(summaries / "chunks").to_table().to_pylist()
    per_doc = Counter(c["row_id"] for c in chunks)
    long_docs = {"d000", "d008", "d016"}  # far longer than the 448-token input budget
    assert set(per_doc) == long_docs
    for r in rows:
        assert r["document_tokens"] > 0 and r["title"].startswith("Document")
        if r["row_id"] in long_docs:
            assert r["document_tokens"] > 448 and r["chunks"] == per_doc[r["row_id"]] >= 5
            assert r["prompt"].startswith("Combine these summaries")  # the reduce prompt
            windows = sorted((c for c in chunks if c["row_id"] == r["row_id"]),
                             key=lambda c: c["chunk_index"])
            assert [c["chunk_index"] for c in windows] == list(range(r["chunks"]))
            assert all(c["chunk_tokens"] <= 256 for c in windows)
            # 256-token windows overlapping by 32 cover the document, nothing more
            assert (r["chunks"] - 1) * 224 < r["document_tokens"] <= (r["chunks"] - 1) * 224 + 256
            for c in windows:
                if c["generation"]:
                    assert f"- {c['generation']}" in r["prompt"]
        else:
            assert r["chunks"] == 0 and r["prompt"].startswith("Summarize this text")
    manifest = json.loads((summaries / "manifest.json").read_text())
    assert manifest["chunked_rows"] == 3 and manifest["chunks"] == len(chunks)
    assert manifest["output_rows"] == len(corpus)


@pytest.mark.ray
def test_outputs_read_alike_in_pandas_arrow_duckdb_datasets_and_ray_data(summaries, ray_local,
                                                                          monkeypatch):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    data = summaries / "data"
    files = sorted(str(p) for p in data.glob("*.parquet"))
    arrow = ds.dataset(data).to_table()
    expect_rows, expect_cols = arrow.num_rows, arrow.column_names

    frame = pd.read_parquet(data)
    assert len(frame) == expect_rows and list(frame.columns) == expect_cols

    con = duckdb.connect()
    cursor = con.execute(f"SELECT * FROM read_parquet({files!r})")
    assert [d[0] for d in cursor.description] == expect_cols
    assert len(cursor.fetchall()) == expect_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    hf = load_dataset("parquet", data_files=files, split="train",
                      cache_dir=str(summaries.parent / "hf-cache"))
    assert hf.num_rows == expect_rows and hf.column_names == expect_cols

    ray_ds = ray_local.data.read_parquet(str(data))
    assert ray_ds.count() == expect_rows and ray_ds.schema().names == expect_cols


@pytest.mark.ray
def test_a_job_can_read_the_output_of_another(summaries, ray_local, tiny_model, tmp_path):
    spec = parse_spec({
        "input": {"path": str(summaries / "data"), "template": "{{ title }}: {{ generation }} Also,",
                  "id_column": "row_id", "columns": ["title"]},
        "model": {"path": tiny_model},
        "generation": {"max_new_tokens": 8},
        "output": {"path": str(tmp_path / "chained")},
        "resources": {"replicas": 1, "shard_rows": 12},
    })
    assert run_job(spec, live=False, log=quiet).rows == 24
    table = pq.read_table(tmp_path / "chained" / "data")
    assert sorted(table.column("row_id").to_pylist()) == sorted(f"d{i:03d}" for i in range(24))


def test_chunking_rules_in_the_spec():
    with pytest.raises(SpecError, match="long_documents: chunk needs template"):
        parse_spec(spec_dict("in", "out", "m", input={"long_documents": "chunk"}))
    base = {"prompt_column": None, "template": "S: {{ text }}", "long_documents": "chunk",
            "chunk_column": "text", "reduce_template": "{{ summaries }}"}
    with pytest.raises(SpecError, match="one summary per row; use generation.n: 1"):
        parse_spec(spec_dict("in", "out", "m", input=base, generation={"n": 2, "temperature": 1}))
    with pytest.raises(SpecError, match="chunk_overlap must be smaller"):
        parse_spec(spec_dict("in", "out", "m", input={**base, "chunk_tokens": 10, "chunk_overlap": 10}))
