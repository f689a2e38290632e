import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import spec_dict

from batchgen.engine.versions import ENGINE_VERSION
from batchgen.errors import ShardError
from batchgen.job.plan import make_plan
from batchgen.shard.rows import row_seed
from batchgen.shard.worker import ShardWorker
from batchgen.spec.load import parse_spec


def hazard_table() -> pa.Table:
    prompts = [b"The cat", None, b"", b"   ", b"\xff\xfe broken",
               b"The cat sees the moon. " * 60, b"A robot builds"]
    return pa.table({
        "id": [f"h{i}" for i in range(len(prompts))],
        # .view skips UTF-8 validation, as a writer with a bug would
        "prompt": pa.array(prompts, pa.binary()).view(pa.string()),
        "topic": ["t"] * len(prompts),
    })


def run_one(tmp_path, tiny_model, table, **sections):
    pq.write_table(table, tmp_path / "in.parquet")
    spec = parse_spec(spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model,
                                **sections))
    plan = make_plan(spec)
    worker = ShardWorker(spec)
    result = worker.run(plan.shards[0], "attempt1")
    staged = pq.read_table(tmp_path / "out" / result.staged)
    return result, staged


def test_bad_rows_become_error_rows_and_the_shard_goes_on(tmp_path, tiny_model):
    result, out = run_one(tmp_path, tiny_model, hazard_table(),
                          model={"truncation": "error", "max_input_tokens": 100})
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert result.rows == 7 and result.outputs == 7 and result.errors == 5
    assert rows["h1"]["error"] == "prompt column 'prompt' is null"
    assert rows["h2"]["error"] == "prompt is empty" == rows["h3"]["error"]
    assert rows["h4"]["error"] == "column 'prompt' holds invalid UTF-8"
    assert "more than model.max_input_tokens=100" in rows["h5"]["error"]
    for rid in ["h1", "h2", "h3", "h4", "h5"]:
        assert rows[rid]["finish_reason"] == "error" and rows[rid]["generation"] is None
    for rid in ["h0", "h6"]:
        assert rows[rid]["error"] is None and rows[rid]["finish_reason"] in ("stop", "length")
        assert rows[rid]["generated_tokens"] > 0 and rows[rid]["prompt_tokens"] > 0
    assert out.column("topic").to_pylist() == ["t"] * 7  # kept input column


def test_n_samples_have_own_seeds_and_one_row_each(tmp_path, tiny_model):
    table = hazard_table().slice(0, 1)
    result, out = run_one(tmp_path, tiny_model, table,
                          generation={"n": 4, "temperature": 1.0, "seed": 5, "max_new_tokens": 16})
    assert out.num_rows == 4 == result.outputs
    assert out.column("sample_index").to_pylist() == [0, 1, 2, 3]
    assert out.column("seed").to_pylist() == [row_seed(5, "h0", s) for s in range(4)]
    assert len(set(out.column("generation").to_pylist())) > 1


def test_duplicate_ids_fail_the_shard_with_the_ids(tmp_path, tiny_model):
    table = hazard_table().slice(0, 2)
    table = table.set_column(0, "id", pa.array(["same", "same"]))
    with pytest.raises(ShardError, match="duplicate values \\(same\\)"):
        run_one(tmp_path, tiny_model, table)
    assert not (tmp_path / "out" / "data").exists()


# -- shards whose every row is an error row (finding 13) -------------------------------------


ALL_ERRORS = {
    "null": (pa.array([None, None], pa.string()), {}, "prompt column 'prompt' is null"),
    "empty": (pa.array(["", "  "]), {}, "prompt is empty"),
    "int": (pa.array([1, 2]), {}, "prompt column 'prompt' holds int, not text"),
    "struct": (pa.array([{"a": 1}, {"a": 2}]), {}, "prompt column 'prompt' holds dict, not text"),
    "list": (pa.array([["x"], ["y"]]), {}, "prompt column 'prompt' holds list, not text"),
    "sandbox": (pa.array(["__class__", "__init__"]),
                {"prompt_column": None, "template": "{{ (topic|attr(prompt)) }}"},
                "template refused by the sandbox: access to attribute '__"),
}


@pytest.mark.parametrize("case", sorted(ALL_ERRORS))
def test_a_shard_of_error_rows_writes_them(case, tmp_path, tiny_model, monkeypatch):
    from batchgen.shard import prompts

    # The planner refuses non-text prompt columns up front (tests/job/test_plan.py); the worker must
    # cope on its own all the same (a plan made by an earlier version, a JSON Lines file).
    monkeypatch.setattr(prompts, "check_column_types", lambda *a: None)
    values, inp, message = ALL_ERRORS[case]
    table = pa.table({"id": ["e0", "e1"], "prompt": values, "topic": ["tea", "tea"]})
    result, out = run_one(tmp_path, tiny_model, table, input=inp,
                          generation={"n": 2, "temperature": 1.0})
    assert result.rows == 2 and result.outputs == 4 == result.errors == out.num_rows
    assert sorted(zip(out.column("row_id").to_pylist(), out.column("sample_index").to_pylist())) == [
        ("e0", 0), ("e0", 1), ("e1", 0), ("e1", 1)]
    for row in out.to_pylist():
        assert row["finish_reason"] == "error" and row["generation"] is None
        assert row["error"].startswith(message) and row["prompt_tokens"] == 0


# -- a template's time and size, a huge row (finding 14) --------------------------------------


def test_a_looping_or_ballooning_template_fails_its_row_within_seconds(tmp_path, tiny_model,
                                                                       monkeypatch):
    from batchgen.shard import sandbox

    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 1.0)
    template = ("{% if topic == 'loop' %}{% for i in range(99999) %}{% for j in range(99999) %}"
                "{% endfor %}{% endfor %}{% elif topic == 'big' %}{{ 'x' * 10**9 }}{% endif %}"
                "Write one sentence about {{ topic }}.")
    table = pa.table({"id": ["ok", "loop", "big"], "topic": ["tea", "loop", "big"]})
    result, out = run_one(tmp_path, tiny_model, table,
                          input={"prompt_column": None, "template": template})
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert rows["loop"]["error"].startswith("template took longer than 1 s to render this row")
    assert rows["big"]["error"].startswith("template would build a repeated sequence ('*') of "
                                           "1,000,000,000 characters (or items), more than the limit")
    assert rows["ok"]["finish_reason"] != "error" and result.errors == 2


@pytest.fixture
def tokenized_lengths(monkeypatch):
    """Lengths of every text the engine tokenizes."""
    from batchgen.engine import Engine

    seen: list[int] = []
    real = Engine.tokenize

    def spy(self, texts, *, chat=False):
        seen.extend(len(t) for t in texts)
        return real(self, texts, chat=chat)

    monkeypatch.setattr(Engine, "tokenize", spy)
    return seen


@pytest.mark.parametrize("truncation", ["left", "right", "error"])
def test_a_10_mb_row_is_not_tokenized_whole(truncation, tmp_path, tiny_model, tokenized_lengths):
    huge = "The cat sees the moon. " * 450_000  # 10 MB
    table = pa.table({"id": ["big", "small"], "prompt": [huge, "The cat"], "topic": ["t", "t"]})
    result, out = run_one(tmp_path, tiny_model, table,
                          model={"truncation": truncation, "max_input_tokens": 100})
    big = out.to_pylist()[0]
    assert max(tokenized_lengths) < 100_000
    if truncation == "error":
        assert big["finish_reason"] == "error" and "more than model.max_input_tokens=100" in big["error"]
    else:
        assert big["error"] is None and big["prompt_tokens"] == 100
    assert out.to_pylist()[1]["error"] is None


@pytest.fixture(scope="module")
def engine(tiny_model):
    from batchgen.engine import Engine
    from batchgen.spec import GenerationSpec, ModelSpec, ResourcesSpec

    return Engine.load(ModelSpec(path=tiny_model, max_input_tokens=100),
                       GenerationSpec(max_new_tokens=8), ResourcesSpec())


TEXTS = [
    "The cat sees the moon. " * 60,  # short enough to be tokenized whole
    "The cat sees the moon. " * 500,
    "x" * 50_000,
    " " * 30_000 + "the end",
    "start " + "\N{SNOWMAN}\N{GRINNING FACE} naïve café " * 3000,
    "\n".join(f"{i}: a line of a log, with numbers {i * 7919}" for i in range(3000)),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_cutting_before_tokenizing_keeps_the_same_tokens(text, side, engine):
    from batchgen.shard import longdocs

    engine.truncation = side
    expected = engine.fit(engine.tokenize([text])[0])
    [tokens] = longdocs.tokenize_bounded(engine, [text], chat=False, keep=side)
    assert longdocs.fit(engine, tokens, len(text)) == expected
    if len(text) > 20_000 and text.strip(" x"):
        assert tokens.part is not None and tokens.part < len(text)


def test_an_empty_batch_is_tokenized_to_nothing(engine):
    from batchgen.shard import longdocs

    assert longdocs.tokenize_bounded(engine, [], chat=False, keep="left") == []


# -- windows of long documents (finding 16) ---------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_windows_cover_every_token_and_repeat_only_the_overlap(size):
    from batchgen.shard.longdocs import window_starts

    for overlap in range(size):
        for n in [0, 1, size - 1, size, size + 1, 3 * size + 2, 1000]:
            starts = list(window_starts(n, size, overlap))
            covered = set().union(*(range(s, min(s + size, n)) for s in starts))
            assert covered == set(range(n)), (n, size, overlap)
            assert all(b - a == size - overlap for a, b in zip(starts, starts[1:]))
            assert all(s + overlap < n for s in starts[1:])  # no window inside the one before


def test_an_overlap_as_large_as_the_window_is_an_error():
    from batchgen.shard.longdocs import window_starts

    with pytest.raises(ValueError):
        window_starts(100, 10, 10)


CHUNKING = {"prompt_column": None, "template": "Summarize: {{ text }}", "long_documents": "chunk",
            "chunk_column": "text", "reduce_template": "Combine: {{ summaries|join(' ') }}",
            "columns": ["id"]}


def test_an_overlap_beyond_the_default_window_fails_the_row_not_the_shard(tmp_path, tiny_model):
    doc = "The old town remembers the long road before the rain. " * 40
    table = pa.table({"id": ["long", "short"], "text": [doc, "A short note."]})
    result, out = run_one(tmp_path, tiny_model, table, input={**CHUNKING, "chunk_overlap": 5000},
                          model={"max_input_tokens": 100}, generation={"max_new_tokens": 4})
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert rows["long"]["finish_reason"] == "error" and result.errors == 1
    assert rows["long"]["error"].startswith("chunking: input.chunk_overlap=5000 is not smaller "
                                            "than the window of ")
    assert "input.chunk_tokens is unset" in rows["long"]["error"] and result.chunks == 0
    assert rows["short"]["error"] is None


def test_default_windows_cover_the_document(tmp_path, tiny_model):
    doc = "The old town remembers the long road before the rain. " * 40
    table = pa.table({"id": ["long"], "text": [doc]})
    result, out = run_one(tmp_path, tiny_model, table, input={**CHUNKING, "chunk_overlap": 10},
                          model={"max_input_tokens": 100}, generation={"max_new_tokens": 4})
    chunks = pq.read_table(tmp_path / "out" / result.staged_chunks).to_pylist()
    row = out.to_pylist()[0]
    size, tokens = chunks[0]["chunk_tokens"], row["document_tokens"]
    assert row["chunks"] == len(chunks) == result.chunks >= 3
    assert (len(chunks) - 1) * (size - 10) < tokens <= (len(chunks) - 1) * (size - 10) + size
    assert sum(c["chunk_tokens"] for c in chunks) == tokens + 10 * (len(chunks) - 1)


def test_the_job_prefix_is_shared_by_every_prompt_and_changes_no_output(tmp_path, tiny_model):
    """The synthetic-data job's system prompt and few-shot examples are one token prefix,
    prefilled once per replica; each row's text alone is prefilled for it. Outputs (greedy and
    seeded, n samples forked) equal those of the same job with no prefix split."""
    from batchgen.shard.worker import engine_record, job_prefix
    from batchgen.spec.load import load_spec

    table = pa.table({"topic_id": [f"q{i}" for i in range(6)],
                      "topic": ["rivers", "tea", "the moon", "bread", "birds", "music"],
                      "level": ["beginner", "expert"] * 3})
    pq.write_table(table, tmp_path / "in.parquet")
    base = load_spec("jobs/synthetic-qa.yaml")
    raw = base.model_dump(mode="json")
    raw["input"]["path"] = str(tmp_path / "in.parquet")
    raw["model"]["path"] = tiny_model
    raw["generation"].update(n=3, temperature=0.9, max_new_tokens=24, dedupe=False)
    outputs = {}
    for split in (True, False):
        raw["output"]["path"] = str(tmp_path / f"out-{split}")
        spec = parse_spec(raw)
        worker = ShardWorker(spec)
        prefix = worker.engine.prefix
        if split:
            assert prefix == job_prefix(spec, worker.engine) and len(prefix) >= 100
            record = engine_record(worker.engine)
            from importlib.metadata import version

            assert record == {"version": ENGINE_VERSION, "path": "slots", "prefix_tokens": len(prefix),
                              "grammar": f"llguidance {version('llguidance')}"}
        else:
            worker.engine.set_prefix(())
        result = worker.run(make_plan(spec).shards[0], "a1")
        assert result.engine["version"] == ENGINE_VERSION
        stats = worker.engine.stats
        if split:
            # the prefix once; each row's own text once, not once per sample
            own = stats.padded_prompt_positions - stats.prefix_positions
            assert stats.prefix_positions >= len(prefix)
            assert own <= 6 * (stats.prompt_tokens / 18 - len(prefix) + 8)
        out = pq.read_table(tmp_path / f"out-{split}" / result.staged)
        outputs[split] = out.select(["row_id", "sample_index", "generation"]).to_pylist()
    assert outputs[True] == outputs[False]


def test_a_window_that_cannot_fit_beside_the_row_fails_the_row_not_cut_silently(tmp_path,
                                                                                  tiny_model):
    # chunk_tokens fits beside the template with empty columns (so the plan accepts it), but
    # this row's own title leaves no room: its windows used to be cut to the budget, silently
    # dropping document text from its summary.
    doc = "The old town remembers the long road before the rain. " * 40
    table = pa.table({"id": ["crowded", "fine"], "title": ["Tea and rivers. " * 12, "Tea."],
                      "text": [doc, doc]})
    result, out = run_one(
        tmp_path, tiny_model, table,
        input={**CHUNKING, "template": "{{ title }} Summarize: {{ text }}", "chunk_tokens": 64},
        model={"max_input_tokens": 100}, generation={"max_new_tokens": 4})
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert rows["crowded"]["finish_reason"] == "error" and result.errors == 1
    assert rows["crowded"]["error"].startswith("chunking: window 0 (64 document tokens) makes a "
                                               "prompt of ")
    assert "more than model.max_input_tokens=100; lower input.chunk_tokens" in rows["crowded"]["error"]
    assert rows["fine"]["error"] is None and rows["fine"]["chunks"] >= 3


@pytest.mark.parametrize("truncation", ["error", "right", "left"])
def test_the_echo_engine_keeps_to_model_truncation(tmp_path, truncation):
    # EchoEngine.fit cut every long prompt from the left, so `truncation: error` dry runs showed
    # no error rows where the real engine would fail them.
    table = pa.table({"id": ["short", "long"], "prompt": ["one two", "one two three four five"],
                      "topic": ["t", "t"]})
    result, out = run_one(tmp_path, "m", table, model={"engine": "echo", "max_input_tokens": 3,
                                                       "truncation": truncation})
    rows = {r["row_id"]: r for r in out.to_pylist()}
    assert rows["short"]["error"] is None and rows["short"]["prompt_tokens"] == 2
    if truncation == "error":
        assert rows["long"]["error"].startswith("prompt has 5 tokens, more than "
                                                "model.max_input_tokens=3")
    else:
        assert rows["long"]["error"] is None and rows["long"]["prompt_tokens"] == 3
