import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import InputError, SpecError
from batchgen.plan import Plan, current_fingerprint, make_plan
from batchgen.spec import parse_spec
from batchgen.storage import read_rows
from conftest import prompt_table, spec_dict


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


def test_current_fingerprint_matches_the_plan_without_reading_files(prompts_dir):
    spec = parse_spec(spec_dict(str(prompts_dir), "out", "m"))
    assert current_fingerprint(spec) == (make_plan(spec).fingerprint, make_plan(spec).fingerprint_parts)
