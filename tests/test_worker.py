import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import ShardError
from batchgen.plan import make_plan
from batchgen.spec import parse_spec
from batchgen.worker import ShardWorker, row_seed
from conftest import spec_dict


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
