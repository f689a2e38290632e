import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import prompt_table, spec_dict

from batchgen.errors import InputError, SpecError
from batchgen.io.inputs import read_rows
from batchgen.job.fingerprint import current_fingerprint
from batchgen.job.plan import Plan, make_plan
from batchgen.spec.load import parse_spec


def spec_for(path, **resources):
    raw = spec_dict(str(path), "/unused", "m")
    raw["resources"].update(resources)
    return parse_spec(raw)


@pytest.mark.parametrize("shard_rows", [1, 7, 10, 16, 1000])
def test_shards_cover_every_row_exactly_once(prompts_dir, shard_rows):
    plan = make_plan(spec_for(prompts_dir, shard_rows=shard_rows))
    expected = pa.concat_tables([pq.read_table(prompts_dir / f"part-{i}.parquet") for i in range(3)])
    assert plan.total_rows == expected.num_rows == 80
    got = []
    for s in plan.shards:
        assert 0 < s.row_count <= shard_rows
        got += read_rows(s.file, s.row_start, s.row_count, ["id"], {}).column("id").to_pylist()
    assert got == expected.column("id").to_pylist()  # every row once, in order
    # row offsets are global and contiguous
    assert [s.row_offset for s in plan.shards] == [
        sum(x.row_count for x in plan.shards[:i]) for i in range(len(plan.shards))]


def test_shard_ids_are_zero_padded_and_stable(prompts_dir):
    a = make_plan(spec_for(prompts_dir, shard_rows=16))
    b = make_plan(spec_for(prompts_dir, shard_rows=16))
    assert [s.shard_id for s in a.shards] == [f"{i:06d}" for i in range(len(a.shards))]
    assert a == b
    # shards never cross files: 23 -> 16+7, 40 -> 16+16+8, 17 -> 16+1
    assert [s.row_count for s in a.shards] == [16, 7, 16, 16, 8, 16, 1]


def test_plan_round_trips_through_json(prompts_dir):
    plan = make_plan(spec_for(prompts_dir))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_fingerprint_names_what_changed(prompts_dir):
    base = make_plan(spec_for(prompts_dir))
    raw = spec_dict(str(prompts_dir), "/unused", "m", generation={"max_new_tokens": 99})
    changed = make_plan(parse_spec(raw))
    assert changed.fingerprint != base.fingerprint
    assert [k for k in base.fingerprint_parts
            if base.fingerprint_parts[k] != changed.fingerprint_parts[k]] == ["generation"]
    # shard size changes the plan, not the outputs
    assert make_plan(spec_for(prompts_dir, shard_rows=5)).fingerprint == base.fingerprint


def test_directory_skips_hidden_and_underscore_paths(prompts_dir):
    (prompts_dir / "_batchgen").mkdir()
    pq.write_table(prompt_table(5), prompts_dir / "_batchgen" / "staged.parquet")
    pq.write_table(prompt_table(5), prompts_dir / ".hidden.parquet")
    (prompts_dir / "notes.txt").write_text("not data")
    assert make_plan(spec_for(prompts_dir)).total_rows == 80


def test_glob_and_single_file(prompts_dir):
    assert make_plan(spec_for(f"{prompts_dir}/part-[01].parquet")).total_rows == 63
    assert make_plan(spec_for(prompts_dir / "part-2.parquet")).total_rows == 17


def test_bad_inputs_fail_with_the_path(tmp_path, prompts_dir):
    with pytest.raises(InputError, match="no such file or directory"):
        make_plan(spec_for(tmp_path / "missing"))
    with pytest.raises(InputError, match="the glob matches no files"):
        make_plan(spec_for(f"{tmp_path}/*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no \\*.parquet/\\*.jsonl/\\*.ndjson files"):
        make_plan(spec_for(tmp_path / "empty"))
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(InputError, match=f"{bad}: not a readable Parquet file"):
        make_plan(spec_for(bad))


def test_missing_column_fails_before_any_work(prompts_dir):
    raw = spec_dict(str(prompts_dir), "/unused", "m")
    raw["input"]["prompt_column"] = "question"
    with pytest.raises(SpecError, match="column\\(s\\) question named by the spec"):
        make_plan(parse_spec(raw))
    raw = spec_dict(str(prompts_dir), "/unused", "m")
    del raw["input"]["prompt_column"]
    raw["input"]["template"] = "About {{ topic }} and {{ mood }}"
    with pytest.raises(SpecError, match="mood"):
        make_plan(parse_spec(raw))


def test_current_fingerprint_matches_the_plan_without_replanning(prompts_dir):
    spec = parse_spec(spec_dict(str(prompts_dir), "out", "m"))
    assert current_fingerprint(spec) == (make_plan(spec).fingerprint, make_plan(spec).fingerprint_parts)


# -- what the fingerprint covers, and what it does not -------------------------------------------


def _parts_changed(base_raw: dict, **sections) -> list[str]:
    changed_raw = json.loads(json.dumps(base_raw))
    for name, values in sections.items():
        changed_raw.setdefault(name, {}).update(values)
    a = make_plan(parse_spec(base_raw)).fingerprint_parts
    b = make_plan(parse_spec(changed_raw)).fingerprint_parts
    return sorted(k for k in a if a[k] != b[k])


@pytest.mark.parametrize("sections, part", [
    ({"input": {"examples": [{"user": "Q?", "assistant": "A."}]}}, "prompt"),
    ({"input": {"format": "parquet"}}, "prompt"),
    ({"input": {"prompt_column": None, "template": "{{ prompt }}", "long_documents": "chunk",
                "chunk_column": "prompt", "reduce_template": "{{ summaries | join(' ') }}"}},
     "prompt"),
    ({"output": {"parse": "json"}}, "output"),
    ({"output": {"parse": "json", "json_schema": {"type": "object"}}}, "output"),
    ({"model": {"trust_remote_code": True}}, "model"),
    ({"generation": {"dedupe": True}}, "generation"),
    ({"generation": {"structured": {"json": True}}}, ("engine", "generation")),  # + llguidance
    ({"generation": {"logprobs": 2}}, "generation"),
    ({"generation": {"reasoning_end": "</think>"}}, "generation"),
    ({"input": {"chat": True, "chat_template_kwargs": {"enable_thinking": False}}}, "prompt"),
    ({"input": {"chat": True, "tools": [{"name": "f"}]}}, "prompt"),
])
def test_every_setting_that_changes_outputs_changes_the_fingerprint(prompts_dir, sections, part):
    base = spec_dict(str(prompts_dir), "/unused", "m")
    assert _parts_changed(base, **sections) == (list(part) if isinstance(part, tuple) else [part])


def test_settings_that_do_not_change_outputs_keep_the_fingerprint(prompts_dir):
    base = spec_dict(str(prompts_dir), "/unused", "m")
    assert _parts_changed(base, resources={"replicas": 7, "batch_size": 3, "shard_rows": 5},
                          output={"path": "/elsewhere", "compression": "gzip"},
                          model={"cache_dir": "/cache"}) == []


def test_local_inputs_are_identified_by_content_not_by_modification_time(prompts_dir, tmp_path):
    import os
    import shutil

    spec = spec_for(prompts_dir)
    before = make_plan(spec).fingerprint
    for f in prompts_dir.iterdir():
        os.utime(f, (1, 1))  # a touch, a fresh checkout
    copy = tmp_path / "copy"
    shutil.copytree(prompts_dir, copy)  # a plain cp gives new times too
    shutil.rmtree(prompts_dir)
    copy.rename(prompts_dir)
    assert current_fingerprint(spec)[0] == before


def test_a_changed_local_file_changes_the_fingerprint(prompts_dir):
    spec = spec_for(prompts_dir)
    before = make_plan(spec).fingerprint_parts["input"]
    pq.write_table(prompt_table(23, start=1000), prompts_dir / "part-0.parquet", row_group_size=10)
    assert current_fingerprint(spec)[1]["input"] != before


def test_model_path_spelling_does_not_change_the_fingerprint(prompts_dir, tmp_path, monkeypatch):
    from batchgen.job.plan import resolve_local_paths

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = parse_spec(spec_dict(str(prompts_dir), "out", "models/tiny"))
    absolute = parse_spec(spec_dict(str(prompts_dir), str(tmp_path / "out"),
                                    str(tmp_path / "models" / "tiny")))
    a, b = resolve_local_paths(relative), resolve_local_paths(absolute)
    assert a.model.path == b.model.path == str(tmp_path / "models" / "tiny")
    assert a.output.path == str(tmp_path / "out")
    assert make_plan(a).fingerprint == make_plan(b).fingerprint


def test_keys_added_after_version_3_leave_the_fingerprint_of_jobs_that_do_not_use_them(prompts_dir):
    """A job written before structured generation, logprobs, messages and scoring existed has
    the fingerprint it had then (the sections as fingerprint version 3 digested them), so it
    still resumes."""
    from batchgen.job.fingerprint import LATER_KEYS, digest as _digest

    spec = spec_for(prompts_dir)
    parts = make_plan(spec).fingerprint_parts
    for part, name in (("prompt", "input"), ("generation", "generation")):
        doc = getattr(spec, name).model_dump(mode="json")
        v3 = {k: v for k, v in doc.items() if k not in LATER_KEYS[name] and k != "path"}
        assert parts[part] == _digest(v3)


def test_a_constrained_job_names_the_grammar_engine_in_its_engine_part(prompts_dir):
    """Another llguidance may mask differently: its version is part of a constrained job's
    fingerprint (and only of those)."""
    from importlib.metadata import version

    from batchgen.engine.versions import ENGINE_VERSION

    base = spec_dict(str(prompts_dir), "/unused", "m")
    plain = make_plan(parse_spec(base)).fingerprint_parts["engine"]
    base["generation"]["structured"] = {"json": True}
    constrained = make_plan(parse_spec(base)).fingerprint_parts["engine"]
    assert plain == str(ENGINE_VERSION)
    assert constrained == f"{ENGINE_VERSION}+llguidance-{version('llguidance')}"


def test_scoring_changes_the_generation_part(prompts_dir):
    base = spec_dict(str(prompts_dir), "/unused", "m")
    scored = json.loads(json.dumps(base))
    scored["mode"] = "score"
    scored["input"]["completion_column"] = "prompt"
    a = make_plan(parse_spec(base)).fingerprint_parts
    b = make_plan(parse_spec(scored)).fingerprint_parts
    assert sorted(k for k in a if a[k] != b[k]) == ["generation", "prompt"]


def test_plans_of_earlier_versions_still_match(prompts_dir):
    from batchgen.job.fingerprint import digest as _digest

    spec = spec_for(prompts_dir)
    plan = make_plan(spec)
    old = plan.to_json()
    del old["fingerprint_version"]  # written by batchgen before fingerprint version 2
    old["fingerprint_parts"] = current_fingerprint(spec, version=1)[1]
    old["fingerprint"] = _digest(old["fingerprint_parts"])
    stored = Plan.from_json(old)
    assert stored.fingerprint_version == 1
    assert current_fingerprint(spec, version=stored.fingerprint_version)[0] == stored.fingerprint


def test_a_fifo_in_the_input_directory_is_refused_not_waited_on(prompts_dir):
    import os

    os.mkfifo(prompts_dir / "pipe.parquet")
    with pytest.raises(InputError, match="pipe.parquet is not a regular file"):
        make_plan(spec_for(prompts_dir))


@pytest.mark.parametrize("inp, out, refused", [
    ("{d}", "{d}/out", True),
    ("{d}", "{d}", True),
    ("{d}/", "{d}/sub/out", True),
    ("{d}/**/*.parquet", "{d}/out", True),
    ("{d}/part-*.parquet", "{d}/out", False),  # the glob cannot match data/part-*.parquet
    ("{d}/*.parquet", "{d}/out", False),  # * stays inside one folder, as fsspec globs
    ("{d}/**/*.parquet", "{d}/_out", True),  # a glob lists _folders too
    ("{d}", "{d}/_out", False),  # a directory listing skips _folders
    ("{d}", "{d}/.out", False),
    ("{d}", "{d}-out", False),
    ("{d}/part-0.parquet", "{d}/out", False),
])
def test_an_output_inside_the_input_is_refused(prompts_dir, inp, out, refused):
    from batchgen.job.plan import check_output_outside_input

    d = str(prompts_dir)
    spec = parse_spec(spec_dict(inp.format(d=d), out.format(d=d), "m"))
    if refused:
        with pytest.raises(SpecError, match="is inside input.path"):
            check_output_outside_input(spec)
    else:
        check_output_outside_input(spec)


def test_an_output_inside_the_input_is_refused_however_spelled(prompts_dir, monkeypatch):
    from batchgen.job.plan import check_output_outside_input

    monkeypatch.chdir(prompts_dir.parent)
    spec = parse_spec(spec_dict(f"./{prompts_dir.name}", f"{prompts_dir}/out", "m"))
    with pytest.raises(SpecError, match="is inside input.path"):
        check_output_outside_input(spec)


@pytest.mark.parametrize("column, values, key", [
    ("prompt", pa.array([1, 2, 3]), "input.prompt_column"),
    ("prompt", pa.array([{"a": "x"}] * 3), "input.prompt_column"),
    ("id", pa.array([{"a": 1}, {"a": 2}, {"a": 3}]), "input.id_column"),
])
def test_column_types_that_fail_every_row_are_refused_when_planning(tmp_path, column, values,
                                                                     key):
    table = prompt_table(3)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    pq.write_table(table, tmp_path / "typed.parquet")
    with pytest.raises(SpecError, match=key):
        make_plan(spec_for(tmp_path / "typed.parquet"))


# -- `batchgen plan` checks what `batchgen run` checks before any work --------------------------

CHUNKS = {"prompt_column": None, "template": "Summarize: {{ text }}", "long_documents": "chunk",
          "chunk_column": "text", "reduce_template": "Combine: {{ summaries|join(' ') }}",
          "columns": ["id"]}


def _chunk_job(tmp_path, tiny_model, **inp):
    pq.write_table(pa.table({"id": ["d0"], "text": ["The old town remembers the rain. " * 40]}),
                   tmp_path / "docs.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_dict(str(tmp_path / "docs.parquet"), str(tmp_path / "out"),
                                        tiny_model, input={**CHUNKS, **inp},
                                        model={"max_input_tokens": 100},
                                        generation={"max_new_tokens": 4})))
    return str(job)


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_overlap_no_window_can_hold_is_refused_before_any_work(command, tmp_path, tiny_model):
    from click.testing import CliRunner

    from batchgen.cli import main

    r = CliRunner().invoke(main, [command, _chunk_job(tmp_path, tiny_model,
                                                      chunk_overlap=1000000)])
    assert r.exit_code == 2, r.output
    # Both numbers: the overlap asked for and the largest window (100 - template - 8).
    assert ("error: input.chunk_overlap=1000000 is not smaller than the window of at most 81 "
            "tokens" in r.output)
    assert "model.max_input_tokens=100 (input.chunk_tokens is unset)" in r.output
    assert not (tmp_path / "out" / "job.json").exists() and not (tmp_path / "out" / "data").exists()


def test_windows_that_cannot_fit_beside_the_template_are_refused_when_planning(tmp_path,
                                                                                tiny_model):
    from batchgen.job.estimate import plan_summary

    spec = parse_spec(json.loads(open(_chunk_job(tmp_path, tiny_model, chunk_tokens=99)).read()))
    with pytest.raises(SpecError, match=r"input.chunk_tokens=99 does not fit: the template takes "
                                        r"\d+ of model.max_input_tokens=100 tokens"):
        plan_summary(spec)
    ok = spec.model_copy(update={"input": spec.input.model_copy(update={"chunk_tokens": 64})})
    assert plan_summary(ok)[1]["rows"] == 1


def test_plan_refuses_duplicate_ids_as_run_does(tmp_path):
    from click.testing import CliRunner

    from batchgen.cli import main

    pq.write_table(pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]}),
                   tmp_path / "in.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m",
                                        model={"engine": "echo"}, input={"columns": ["id"]})))
    r = CliRunner().invoke(main, ["plan", str(job)])
    assert r.exit_code == 2, r.output
    assert "input.id_column 'id' has 1 duplicate value(s) ('a')" in r.output


def test_plan_says_when_sampled_rows_would_be_error_rows(tmp_path):
    from click.testing import CliRunner

    from batchgen.cli import main

    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["Write one sentence.", None]}),
                   tmp_path / "in.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec_dict(str(tmp_path / "in.parquet"), str(tmp_path / "out"), "m",
                                        model={"engine": "echo"}, input={"columns": ["id"]})))
    r = CliRunner().invoke(main, ["plan", str(job), "--json"])
    summary = json.loads(r.stdout)
    assert summary["sampled_rows"] == 2 and summary["sampled_error_rows"] == 1
    assert summary["first_error"] == "prompt column 'prompt' is null"
    r = CliRunner().invoke(main, ["plan", str(job)])
    assert ("warning: 1 of the 2 rows sampled would be error rows, e.g.: prompt column 'prompt' "
            "is null") in r.stderr
