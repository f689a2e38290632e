"""Fault injection on real Ray, the tiny model and real S3 servers on loopback (moto, SeaweedFS).

Each scenario checks the outcome users care about: every (row_id, sample_index) exactly once in
``data/``, nothing partial anywhere a reader looks, and a failed or killed job that resumes. The
counts are recorded with ``tally`` and printed as a table at the end of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import BIN, REPO, spec_dict, tally, wait_until

from batchgen.cli import main
from batchgen.errors import JobFailed
from batchgen.io.storage import Storage, output_storage, storage_options
from batchgen.job.commit import Committer, Task
from batchgen.job.driver import run_job
from batchgen.job.plan import Plan, make_plan
from batchgen.shard.worker import ShardWorker
from batchgen.spec.load import parse_spec

SAMPLING = {"n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 11, "max_new_tokens": 40}
IDS = [f"r{i:05d}" for i in range(80)]
# Open-ended prompts, so the tiny model writes text (it tends to stop at once after a full stop).
OPEN = {"prompt_column": None, "template": "The {{ topic }} and the"}


def quiet(_line):
    pass


def expected(ids=IDS, n=2) -> set[tuple]:
    return {(i, s) for i in ids for s in range(n)}


def newest_lock(out: Path) -> dict:
    return json.loads(sorted((out / "_batchgen" / "lock").iterdir())[-1].read_text())


def output_rows(out: str, options: dict | None = None) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(out, **(options or {}))
    rows = []
    for path in sorted(fs.ls(f"{root}/data", detail=False)):
        assert Path(path).name.startswith("part-") and path.endswith(".parquet"), path
        with fs.open(path, "rb") as f:
            rows += pq.ParquetFile(f).read().to_pylist()
    return rows


def keys(rows) -> list[tuple]:
    return [(r["row_id"], r["sample_index"]) for r in rows]


def done_count(out: Path) -> int:
    d = out / "_batchgen" / "done"
    return len(list(d.iterdir())) if d.exists() else 0


class Background:
    """run_job in a thread, as the driver of a test that injects faults around it."""

    def __init__(self, *args, **kwargs):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs):
        try:
            self.result = run_job(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def join(self, timeout=300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def reference_shard(spec_raw: dict, tmp_path: Path, shard, batch_size: int):
    """The shard generated directly, in this process, with another batch size."""
    raw = json.loads(json.dumps(spec_raw))
    raw["output"]["path"] = str(tmp_path / f"ref-{batch_size}")
    raw["resources"]["batch_size"] = batch_size
    worker = ShardWorker(parse_spec(raw))
    result = worker.run(shard, "reference")
    return pq.read_table(Path(raw["output"]["path"]) / result.staged).to_pylist()


# -- Ray failures ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_actor_killed_mid_shard(ray_local, tiny_model, prompts_dir, tmp_path):
    out = tmp_path / "out"
    raw = spec_dict(str(prompts_dir), str(out), tiny_model, input=OPEN, generation=SAMPLING,
                    resources={"replicas": 2, "shard_rows": 4, "batch_size": 8})
    job = Background(parse_spec(raw), live=False, log=quiet)
    wait_until(lambda: done_count(out) >= 1, timeout=120)
    first = json.loads(next((out / "_batchgen" / "done").iterdir()).read_text())
    # That replica is loaded and busy: it always holds a second shard besides the one it finished.
    named = {a["name"]: a["namespace"] for a in ray_local.util.list_named_actors(all_namespaces=True)}
    victim = ray_local.get_actor(first["replica"], namespace=named[first["replica"]])
    ray_local.kill(victim, no_restart=False)  # as the OOM killer would: Ray may restart it
    job.join()

    rows = output_rows(str(out))
    line = tally("ray.kill a replica mid-shard", keys(rows), expected())
    assert line["duplicates"] == line["lost"] == line["unexpected"] == 0
    markers = [json.loads(p.read_text()) for p in (out / "_batchgen" / "done").iterdir()]
    retried = [m for m in markers if m["attempts"] > 1]
    assert retried, "the kill hit no shard in flight"
    # A retried shard regenerates exactly what one uninterrupted run, at batch size 1, does.
    plan = Plan.from_json(json.loads((out / "plan.json").read_text()))
    shard = next(s for s in plan.shards if s.shard_id == retried[0]["shard_id"])
    committed = pq.read_table(out / "data" / f"part-{shard.shard_id}.parquet").to_pylist()
    assert committed == reference_shard(raw, tmp_path, shard, batch_size=1)


NODE_LOSS = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from batchgen.job.driver import run_job
    from batchgen.spec.load import parse_spec

    spec = parse_spec(json.loads(sys.argv[1]))
    out = Path(spec.output.path)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    result = {}
    def drive():
        try:
            result["summary"] = run_job(spec, live=False, log=print).state
        except BaseException as e:
            result["error"] = repr(e)
    t = threading.Thread(target=drive); t.start()
    done = out / "_batchgen" / "done"
    while t.is_alive() and not (done.exists() and len(list(done.iterdir())) >= 1):
        time.sleep(0.1)
    # The node whose replica committed first: it has loaded and holds its next shard.
    busy = json.loads(next(done.iterdir()).read_text())
    victim = next(w for w in workers if w.node_id == busy["node_id"])
    lost = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    # A lost machine takes every process with it; the replica's worker process would otherwise
    # run on for a while after its raylet is gone, finishing what it holds.
    import os, signal
    try:
        os.kill(busy["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    result["removed_at_done"] = len(list(done.iterdir()))
    t.join(600)
    result["lost_node"] = lost
    ray.shutdown(); cluster.shutdown()
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
@pytest.mark.ray
def test_node_lost_mid_job(tiny_model, prompts_dir, tmp_path):
    out = tmp_path / "out"
    # Shards of a few seconds each (batch size 1), so the node goes while one is running.
    raw = spec_dict(str(prompts_dir), str(out), tiny_model, input=OPEN,
                    generation={**SAMPLING, "max_new_tokens": 64},
                    resources={"replicas": 2, "shard_rows": 8, "batch_size": 1})
    ray_tmp = tempfile.mkdtemp(prefix="bgnl", dir="/tmp")  # short: Ray's socket paths are long
    # On one host Ray swaps 127.0.0.1 for the host's address when nodes join; this keeps loopback.
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-c", NODE_LOSS, json.dumps(raw)],
                              capture_output=True, text=True, timeout=600, env=env)
    finally:
        _kill_processes_under(ray_tmp)
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and last, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(last[-1][7:])
    assert result.get("summary") == "completed", result
    assert result["removed_at_done"] < 10, "the node was removed after the job had finished"

    rows = output_rows(str(out))
    line = tally("remove_node (one of two worker nodes) mid-job", keys(rows), expected())
    assert line["duplicates"] == line["lost"] == line["unexpected"] == 0
    markers = [json.loads(p.read_text()) for p in (out / "_batchgen" / "done").iterdir()]
    assert any(m["attempts"] > 1 for m in markers), ("no shard was in flight on the lost node",
                                                     proc.stdout[-3000:])


def _kill_processes_under(path: str) -> None:
    """Stop only the processes this test started: those whose command line names ``path`` or
    that carry it as RAY_TMPDIR (Ray's agents rename themselves, e.g. ray::DashboardAgent)."""
    me = os.getpid()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(proc.name)
            ours = path.encode() in (proc / "cmdline").read_bytes() or \
                f"RAY_TMPDIR={path}".encode() in (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if ours and pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(path, ignore_errors=True)


# -- The driver dies ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_driver_sigkill_then_resume_and_a_second_driver_is_refused(tiny_model, tmp_path):
    from conftest import prompt_table

    # Long enough that the second driver starts while the first is mid-job: ~100 shards.
    inp = tmp_path / "big"
    inp.mkdir()
    for i in range(3):
        pq.write_table(prompt_table(200, 200 * i), inp / f"part-{i}.parquet", row_group_size=50)
    ids = [f"r{i:05d}" for i in range(600)]
    out = tmp_path / "out"
    job = tmp_path / "job.json"  # JSON is YAML
    job.write_text(json.dumps(spec_dict(
        str(inp), str(out), tiny_model, input=OPEN, generation={**SAMPLING, "max_new_tokens": 64},
        resources={"replicas": 1, "shard_rows": 6, "batch_size": 1})))
    ray_tmp = tempfile.mkdtemp(prefix="bgdk", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        driver = subprocess.Popen([str(BIN / "batchgen"), "run", str(job), "--no-progress"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: done_count(out) >= 2, timeout=180)

        # A second driver on the same output is refused, naming the holder, and changes nothing.
        second = subprocess.run([str(BIN / "batchgen"), "run", str(job), "--no-progress"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is in use by another driver" in second.stderr
        assert f"pid {driver.pid} on" in second.stderr

        committed = {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert "released_at" not in newest_lock(out)  # a killed driver cannot clean up
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_processes_under(ray_tmp)  # its Ray, as a lost machine would take it

    ray_tmp = tempfile.mkdtemp(prefix="bgdk", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    try:
        resumed = subprocess.run([str(BIN / "batchgen"), "resume", str(out), "--no-progress"],
                                 capture_output=True, text=True, timeout=300, env=env)
    finally:
        _kill_processes_under(ray_tmp)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "shards already committed" in resumed.stdout

    rows = output_rows(str(out))
    line = tally("SIGKILL the driver, then batchgen resume", keys(rows), expected(ids))
    assert line["duplicates"] == line["lost"] == line["unexpected"] == 0
    for name, blob in committed.items():  # shards committed before the kill are untouched
        assert (out / "data" / name).read_bytes() == blob, name
    assert newest_lock(out)["released_at"]
    assert (out / "_SUCCESS").exists()


# -- Commit protocol ---------------------------------------------------------------------------


@pytest.mark.s3
def test_zombie_attempt_never_reaches_data(tiny_model, prompts_dir, s3_endpoint, s3_bucket):
    out = f"{s3_bucket}/zombie"
    spec = parse_spec(spec_dict(str(prompts_dir), out, tiny_model, input=OPEN, generation=SAMPLING,
                                storage={"endpoint_url": s3_endpoint}))
    store = output_storage(spec)
    shard = make_plan(spec).shards[0]
    worker = ShardWorker(spec)
    committer = Committer(store, lock=None, markers={}, failed_ids=set())
    task = Task(shard)

    # The driver gave up on attempt "old" (say its node went silent) and started "new".
    late = worker.run(shard, "old").to_dict()
    assert store.exists(late["staged"])
    assert committer.commit(task, late, current="new", attempts=2) is None
    assert not store.exists(late["staged"]) and not store.exists("data")

    fresh = worker.run(shard, "new").to_dict()
    assert committer.commit(task, fresh, current="new", attempts=2) is not None
    final = store.read_bytes(f"data/part-{shard.shard_id}.parquet")

    # Another zombie, after the commit: discarded, the committed file is untouched.
    assert committer.commit(task, worker.run(shard, "stale").to_dict(), current="newer",
                            attempts=3) is None
    assert store.read_bytes(f"data/part-{shard.shard_id}.parquet") == final
    assert store.list_names("data") == [f"part-{shard.shard_id}.parquet"]
    assert store.list_names("_batchgen/staging") == []
    rows = pq.ParquetFile(store.open_read(f"data/part-{shard.shard_id}.parquet")).read().to_pylist()
    line = tally("zombie attempts before and after the commit", keys(rows),
                 expected(IDS[:16]))
    assert line["duplicates"] == line["lost"] == 0


@pytest.mark.s3
def test_exception_while_writing_leaves_nothing_visible(tiny_model, prompts_dir, s3_endpoint,
                                                        s3_bucket, monkeypatch, tmp_path):
    local_tmp = tmp_path / "tmp"  # the worker's local files, where no other test writes
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
    out = f"{s3_bucket}/crash"
    spec = parse_spec(spec_dict(str(prompts_dir), out, tiny_model,
                                storage={"endpoint_url": s3_endpoint}))
    shard = make_plan(spec).shards[0]
    worker = ShardWorker(spec)
    real_write = pq.write_table

    def write_then_fail(table, where, **kw):  # a crash half way through the local file
        real_write(table.slice(0, 3), where, **kw)
        raise OSError("No space left on device")

    monkeypatch.setattr("batchgen.shard.worker.pq.write_table", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        worker.run(shard, "a1")
    monkeypatch.setattr("batchgen.shard.worker.pq.write_table", real_write)

    def upload_fails(lpath, rpath, **kw):  # the connection drops during the upload
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(worker.output.fs, "put_file", upload_fails)
    with pytest.raises(ConnectionError):
        worker.run(shard, "a2")
    monkeypatch.undo()
    fs, root = fsspec.core.url_to_fs(out, **storage_options(out, s3_endpoint))
    assert not fs.exists(root) or fs.find(root) == []
    assert list(local_tmp.iterdir()) == []  # no local file left behind either


# -- Storage outages and shards that keep failing ----------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_s3_server_down_for_seconds_mid_job(ray_local, tiny_model, prompts_dir, seaweed):
    bucket = seaweed.bucket()
    fs = fsspec.filesystem("s3", endpoint_url=seaweed.endpoint)
    for p in sorted(prompts_dir.iterdir()):
        fs.put_file(str(p), f"{bucket[5:]}/in/{p.name}")
    out = f"{bucket}/out"
    spec = parse_spec(spec_dict(f"{bucket}/in", out, tiny_model, input=OPEN, generation=SAMPLING,
                                storage={"endpoint_url": seaweed.endpoint},
                                resources={"replicas": 2, "shard_rows": 4, "batch_size": 8}))
    store = output_storage(spec)
    job = Background(spec, live=False, log=quiet)
    wait_until(lambda: len(store.list_names("_batchgen/done")) >= 2, timeout=180, every=0.3)
    seaweed.stop()
    time.sleep(4)
    seaweed.start()
    summary = job.join(timeout=600)
    assert summary.state == "completed"

    rows = output_rows(out, storage_options(out, seaweed.endpoint))
    line = tally("SeaweedFS stopped 4 s mid-job, then restarted", keys(rows), expected())
    assert line["duplicates"] == line["lost"] == line["unexpected"] == 0
    assert store.exists("_SUCCESS")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_shard_failing_every_attempt_then_resume(ray_local, tiny_model, prompts_dir, s3_endpoint,
                                                 s3_bucket):
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    for p in sorted(prompts_dir.iterdir()):
        fs.put_file(str(p), f"{s3_bucket[5:]}/in/{p.name}")
    out = f"{s3_bucket}/out"
    spec = parse_spec(spec_dict(f"{s3_bucket}/in", out, tiny_model,
                                storage={"endpoint_url": s3_endpoint},
                                resources={"replicas": 2, "shard_rows": 16, "max_attempts": 2}))
    store = output_storage(spec)
    gone = f"{s3_bucket[5:]}/in/part-2.parquet"  # the last file: 17 rows, shards 000005-000006
    job = Background(spec, live=False, log=quiet)
    # The input object disappears once the job is planned (a lifecycle rule, a bad sync...).
    wait_until(lambda: store.exists("plan.json"), timeout=120, every=0.02)
    fs.rm(gone)
    with pytest.raises(JobFailed) as failed:
        job.join()
    msg = str(failed.value)
    assert "2 shard(s) failed after 2 attempts: 000005, 000006" in msg
    assert f"batchgen resume {out} --endpoint-url {s3_endpoint}" in msg
    assert store.list_names("_batchgen/failed") == ["000005.json", "000006.json"]
    assert store.list_names("data") == [f"part-{i:06d}.parquet" for i in range(5)]
    assert not store.exists("_SUCCESS")
    status = store.read_json("status.json")
    assert status["state"] == "failed" and status["failed_shards"] == ["000005", "000006"]

    fs.put_file(str(prompts_dir / "part-2.parquet"), gone)  # the cause removed: same bytes back
    r = CliRunner().invoke(main, ["resume", out, "--endpoint-url", s3_endpoint, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert store.list_names("_batchgen/failed") == []
    rows = output_rows(out, storage_options(out, s3_endpoint))
    line = tally("input object gone: 2 shards fail twice; resume", keys(rows), expected(n=1))
    assert line["duplicates"] == line["lost"] == line["unexpected"] == 0


# -- Row errors, retried -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_retry_failed_reruns_only_error_rows(ray_local, tiny_model, tmp_path):
    import pyarrow as pa
    from conftest import prompt_table
    from test_worker import hazard_table

    clean = prompt_table(5).cast(hazard_table().schema)
    table = pa.concat_tables([hazard_table(), hazard_table(), clean])
    ids = [f"h{i:02d}" for i in range(19)]
    table = table.set_column(0, "id", pa.array(ids))
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(spec_dict(
        str(tmp_path / "in.parquet"), str(out), tiny_model, generation=SAMPLING,
        model={"truncation": "error", "max_input_tokens": 100},
        resources={"replicas": 1, "shard_rows": 7})))
    r = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert r.exit_code == 0, r.output
    before = {(x["row_id"], x["sample_index"]): x for x in output_rows(str(out))}
    files_before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    too_long = {k for k, x in before.items() if "max_input_tokens" in (x["error"] or "")}
    assert len(too_long) == 4  # 2 rows x n=2

    # Same job: nothing changed, so --retry-failed alone regenerates the same errors.
    # Let long prompts be cut instead (a change to outputs, hence --force) and retry the errors.
    r = CliRunner().invoke(main, ["resume", str(out), "--retry-failed", "--force",
                                  "--set", "model.truncation=left", "--no-progress"])
    assert r.exit_code == 0, r.output
    after = {(x["row_id"], x["sample_index"]): x for x in output_rows(str(out))}
    assert set(after) == set(before)
    for k in too_long:
        assert after[k]["finish_reason"] in ("stop", "length") and after[k]["error"] is None
        assert after[k]["seed"] == before[k]["seed"]
    for k in set(before) - too_long:  # every other row exactly as it was
        assert after[k] == before[k]
    redone = {x["row_id"] for x in before.values() if x["error"]}
    untouched = [n for n in files_before
                 if not redone & set(pq.read_table(out / "data" / n).column("row_id").to_pylist())]
    assert untouched  # shards without error rows are not rewritten at all
    assert all((out / "data" / n).read_bytes() == files_before[n] for n in untouched)
    markers = [json.loads(p.read_text()) for p in (out / "_batchgen" / "done").iterdir()]
    assert sum(m.get("errors_before_retry", m["errors"]) for m in markers) == sum(
        1 for x in before.values() if x["error"])
    line = tally("--retry-failed after a fix (error rows only)", keys(output_rows(str(out))),
                 expected(ids))
    assert line["duplicates"] == line["lost"] == 0


def test_sampling_identical_across_attempts_and_batch_sizes(tiny_model, prompts_dir, tmp_path):
    raw = spec_dict(str(prompts_dir), str(tmp_path / "a"), tiny_model, input=OPEN, generation=SAMPLING,
                    resources={"batch_size": 8})
    shard = make_plan(parse_spec(raw)).shards[1]
    big = reference_shard(raw, tmp_path, shard, batch_size=8)
    small = reference_shard(raw, tmp_path, shard, batch_size=3)
    assert big == small
    assert len({r["generation"] for r in big}) >= len(big) // 2  # real sampling, not one text


# -- Bad input: a clear message, before any work, and nothing visible in the output ------------


def _bad_inputs(tmp_path: Path, prompts_dir: Path, tiny_model: str) -> dict:
    from conftest import prompt_table

    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("id,prompt\n1,hello\n")
    corrupt = tmp_path / "corrupt.parquet"
    blob = (prompts_dir / "part-1.parquet").read_bytes()
    corrupt.write_bytes(blob[: len(blob) // 2])
    dupes = tmp_path / "dupes"
    dupes.mkdir()
    pq.write_table(prompt_table(10), dupes / "a.parquet")
    pq.write_table(prompt_table(10, start=7), dupes / "b.parquet")  # r00007..r00009 twice
    null_ids = tmp_path / "null-ids.parquet"
    pq.write_table(prompt_table(4).set_column(0, "id", __import__("pyarrow").array(
        ["a", None, "c", "d"])), null_ids)
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{not json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    inp = str(prompts_dir)
    return {
        "missing input path": ({"input": {"path": str(tmp_path / "nope")}},
                               "nope: no such file or directory"),
        "empty glob": ({"input": {"path": f"{prompts_dir}/*.csv"}}, "the glob matches no files"),
        "not Parquet": ({"input": {"path": str(not_parquet)}}, "not a readable Parquet file"),
        "corrupt Parquet": ({"input": {"path": str(corrupt)}}, "not a readable Parquet file"),
        "missing prompt column": ({"input": {"path": inp, "prompt_column": "text"}},
                                  "column(s) text named by the spec"),
        "missing id column": ({"input": {"path": inp, "id_column": "uid"}},
                              "column(s) uid named by the spec"),
        "duplicate ids": ({"input": {"path": str(dupes)}},
                          "input.id_column 'id' has 3 duplicate value(s) ('r00007', 'r00008', 'r00009')"),
        "null id": ({"input": {"path": str(null_ids)}},
                    "input.id_column 'id' is null in 1 row(s), the first at row 1"),
        "invalid template": ({"input": {"path": inp, "prompt_column": None, "template": "{{ topic "}},
                             "input.template: invalid Jinja2 template"),
        "unloadable model": ({"input": {"path": inp}, "model": {"path": str(broken_model)}},
                             "cannot load the model config"),
        "unwritable output": ({"input": {"path": inp}, "output": {"path": str(blocker / "out")}},
                              "cannot write there"),
        "output holds a different job": ({"input": {"path": inp}, "different_job": True},
                                         "holds a different job (changed: generation)"),
    }


BAD = ["missing input path", "empty glob", "not Parquet", "corrupt Parquet", "missing prompt column",
       "missing id column", "duplicate ids", "null id", "invalid template", "unloadable model",
       "unwritable output", "output holds a different job"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_first_with_a_clear_message(case, tmp_path, prompts_dir, tiny_model):
    sections, message = _bad_inputs(tmp_path, prompts_dir, tiny_model)[case]
    out = tmp_path / "out"
    raw = spec_dict(str(prompts_dir), str(out), tiny_model)
    for name, values in sections.items():
        if name != "different_job":
            raw[name].update(values)
    if sections.get("different_job"):  # an earlier job, with other generation settings
        earlier = json.loads(json.dumps(raw))
        earlier["generation"]["temperature"] = 0.5
        Storage(str(out)).write_json("plan.json", make_plan(parse_spec(earlier)).to_json())
    job = tmp_path / "job.json"
    job.write_text(json.dumps(raw))
    r = CliRunner().invoke(main, ["run", str(job), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1  # one line, no traceback
    out_dir = Path(raw["output"]["path"])
    for left in ("data", "job.json", "_SUCCESS", "manifest.json", "_batchgen/staging"):
        assert not (out_dir / left).exists(), left
    lock_dir = out_dir / "_batchgen" / "lock"
    assert not lock_dir.exists() or all(json.loads(p.read_text()).get("released_at")
                                        for p in lock_dir.iterdir())
    if not sections.get("different_job"):
        assert not (out_dir / "plan.json").exists()


def test_a_stop_signal_waits_for_the_commit_in_progress():
    from batchgen.job.interrupts import Interrupts

    interrupts = Interrupts()
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.critical():
            steps.append("publish")
            interrupts.handler(signal.SIGTERM, None)  # arrives mid-commit: held
            steps.append("marker")
    assert steps == ["publish", "marker"]  # the commit finished, then the stop took effect
    with pytest.raises(KeyboardInterrupt):
        interrupts.handler(signal.SIGTERM, None)  # outside a commit: at once


def test_a_stop_held_by_a_failed_commit_does_not_cancel_the_next_one():
    """A signal held during a commit that then raised must not linger and cancel a later
    commit (or the next job run in the same process)."""
    from batchgen.job.interrupts import Interrupts

    interrupts = Interrupts()
    with pytest.raises(OSError):
        with interrupts.critical():
            interrupts.handler(signal.SIGTERM, None)
            raise OSError("storage went away mid-commit")
    with interrupts.critical():  # the next commit completes
        pass

