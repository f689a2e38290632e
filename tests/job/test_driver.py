"""End to end on a real local Ray with 2 replicas, local disk and a real S3 server on loopback."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import spec_dict

from batchgen.errors import BatchgenError, ModelError, StorageError
from batchgen.job.driver import run_job
from batchgen.spec.load import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SAMPLING = {"n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 3, "max_new_tokens": 12}


def quiet(_line):
    pass


def check_complete(fs, out: str, input_ids: list[str], n: int, shards: int) -> list[dict]:
    """Every input row exactly once per sample index; layout and counts as documented."""
    names = sorted(Path(p).name for p in fs.ls(f"{out}/data", detail=False))
    assert names == [f"part-{i:06d}.parquet" for i in range(shards)]
    rows = []
    for name in names:
        with fs.open(f"{out}/data/{name}", "rb") as f:
            rows += pq.ParquetFile(f).read().to_pylist()
    keys = Counter((r["row_id"], r["sample_index"]) for r in rows)
    assert set(keys) == {(i, s) for i in input_ids for s in range(n)}
    assert max(keys.values()) == 1
    manifest = json.loads(fs.cat(f"{out}/manifest.json"))
    assert manifest["input_rows"] == len(input_ids)
    assert manifest["output_rows"] == len(rows) == len(input_ids) * n
    assert sum(f["rows"] for f in manifest["files"]) == len(rows)
    assert manifest["generated_tokens"] == sum(r["generated_tokens"] for r in rows)
    assert fs.exists(f"{out}/_SUCCESS")
    status = json.loads(fs.cat(f"{out}/status.json"))
    assert status["state"] == "completed"
    assert status["shards"]["running"] == 0  # was the last feed's count: "running": 1
    assert status["request_counts"] == {"total": len(input_ids) * n, "completed": len(rows), "failed": 0}
    assert len(fs.ls(f"{out}/_batchgen/done")) == shards
    staging = f"{out}/_batchgen/staging"
    # (SeaweedFS keeps emptied folders as entries of their own; no staged file may be left.)
    assert not fs.exists(staging) or not [p for p in fs.find(staging) if p.endswith(".parquet")]
    return rows


def all_ids(n=80):
    return [f"r{i:05d}" for i in range(n)]


def test_local_job_two_replicas(ray_local, tiny_model, prompts_dir, tmp_path):
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(prompts_dir), str(out), tiny_model, generation=SAMPLING))
    summary = run_job(spec, live=False, log=quiet)
    assert summary.state == "completed" and summary.rows == 80 and summary.outputs == 160
    fs = s3fs.core.fsspec.filesystem("file")
    rows = check_complete(fs, str(out), all_ids(), n=2, shards=7)
    assert all(r["generation"] is not None and r["error"] is None for r in rows)
    assert {r["topic"] for r in rows} >= {"tea", "robots"}
    job = json.loads((out / "job.json").read_text())
    assert job["spec"]["generation"]["n"] == 2 and job["fingerprint"]

    # Running the same job again on its output resumes it: nothing to do, nothing duplicated.
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    (out / "_SUCCESS").unlink()
    (out / "_batchgen/done/000003.json").unlink()
    (out / "data/part-000003.parquet").unlink()
    run_job(spec, live=False, log=quiet)
    check_complete(fs, str(out), all_ids(), n=2, shards=7)
    after = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    assert after == before  # the redone shard regenerated identical bytes; the others untouched

    # A changed spec on the same output is refused, naming what changed.
    changed = parse_spec(spec_dict(str(prompts_dir), str(out), tiny_model,
                                   generation={**SAMPLING, "seed": 4}))
    with pytest.raises(StorageError, match=r"holds a different job \(changed: generation.seed "
                                           r"\(3 -> 4\)\)"):
        run_job(changed, live=False, log=quiet)


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_server(request) -> tuple[str, str]:
    """(endpoint, bucket URL) on moto's server, then on SeaweedFS, a production object store."""
    if request.param == "moto":
        return request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    weed = request.getfixturevalue("seaweed")
    return weed.endpoint, weed.bucket()


@pytest.mark.s3
def test_s3_input_and_output(ray_local, tiny_model, prompts_dir, s3_server):
    s3_endpoint, s3_bucket = s3_server
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.put(str(prompts_dir) + "/", f"{s3_bucket}/in/", recursive=True)
    out = f"{s3_bucket}/out"
    spec = parse_spec(spec_dict(f"{s3_bucket}/in/", out, tiny_model, generation=SAMPLING,
                                storage={"endpoint_url": s3_endpoint}))
    summary = run_job(spec, live=False, log=quiet)
    assert summary.outputs == 160
    fs.invalidate_cache()
    check_complete(fs, out, all_ids(), n=2, shards=7)
    plan = json.loads(fs.cat(f"{out}/plan.json"))
    assert plan["shards"][0]["file"].startswith(f"{s3_bucket}/in/part-0.parquet")


def test_unloadable_model_fails_before_any_work(ray_local, prompts_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(prompts_dir), str(out), str(broken)))
    with pytest.raises(ModelError, match=f"model.path {broken}: cannot load the model config"):
        run_job(spec, live=False, log=quiet)
    assert not (out / "plan.json").exists() and not (out / "data").exists()


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def test_a_replica_that_cannot_load_ends_the_job_failed(ray_local, prompts_dir, tiny_model,
                                                        tmp_path):
    """Config and tokenizer pass the driver's check, the weights do not load in the replica:
    the job ends `failed` with the reason, not `in_progress` for good."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(prompts_dir), str(out), str(broken)))
    with pytest.raises(BatchgenError, match="model replicas cannot start"):
        run_job(spec, live=False, log=quiet)
    status = _status(out)
    assert status["state"] == "failed" and "model replicas cannot start" in status["error"]
    assert status["finished_at"]


def test_gpus_on_a_machine_without_them_end_the_job_failed(ray_local, prompts_dir, tiny_model,
                                                           tmp_path):
    out = tmp_path / "out"
    spec = parse_spec(spec_dict(str(prompts_dir), str(out), tiny_model,
                                resources={"gpus_per_replica": 1}))
    with pytest.raises(BatchgenError, match="a replica needs 1.0 CPU and 1.0 GPU"):
        run_job(spec, live=False, log=quiet)
    status = _status(out)
    assert status["state"] == "failed" and "GPU" in status["error"]


def test_paths_are_resolved_once_so_resume_and_submit_find_the_same_job(
        ray_local, prompts_dir, tiny_model, tmp_path, monkeypatch):
    """The README walk-through: `make demo` runs with relative paths, `batchgen submit` makes
    them absolute; `batchgen resume OUTPUT` runs from anywhere. All three are one job."""
    import shutil

    from batchgen.job.plan import resolve_local_paths
    from batchgen.job.status import stored_spec

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, work / "models" / "tiny")
    shutil.copytree(prompts_dir, work / "in")
    monkeypatch.chdir(work)
    raw = spec_dict("in", "out", "models/tiny", resources={"replicas": 1, "shard_rows": 40})
    run_job(parse_spec(raw), live=False, log=quiet)
    job = json.loads((work / "out" / "job.json").read_text())
    assert job["spec"]["model"]["path"] == str(work / "models" / "tiny")
    assert job["spec"]["input"]["path"] == str(work / "in")

    (work / "out" / "_SUCCESS").unlink()  # so each run below has to prove it matched the plan
    run_job(resolve_local_paths(parse_spec(raw)), live=False, log=quiet)  # what submit sends
    monkeypatch.chdir(tmp_path)
    run_job(stored_spec(str(work / "out")), live=False, log=quiet)  # resume from elsewhere
    assert (work / "out" / "_SUCCESS").exists()
