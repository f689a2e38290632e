"""The commit protocol and the run's preparation, without Ray: markers, index, completion, lock."""

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import spec_dict

from batchgen.errors import BatchgenError
from batchgen.io import layout
from batchgen.io.inputs import Shard
from batchgen.io.storage import output_storage
from batchgen.job.commit import Committer, Task, load_markers
from batchgen.job.lock import JobLock, LockLost, epoch_path
from batchgen.job.plan import make_plan
from batchgen.job.prepare import _job_doc, prepare
from batchgen.job.status import read_status
from batchgen.spec.load import parse_spec

SHARD = Shard("000000", "in.parquet", 0, 4, 0)


def quiet(_line):
    pass


def staged(out, attempt: str) -> dict:
    rel = layout.staged_path(SHARD.shard_id, attempt)
    out.write_bytes(rel, b"parquet bytes")
    return {"shard_id": SHARD.shard_id, "attempt": attempt, "staged": rel, "rows": 4,
            "outputs": 4, "errors": 0, "prompt_tokens": 10, "generated_tokens": 20}


def test_a_driver_that_lost_the_lock_publishes_nothing(tmp_path):
    out = output_storage(parse_spec(spec_dict("in", str(tmp_path / "out"), "m")))
    lock = JobLock(out, beat_s=3600)
    lock.acquire()
    committer = Committer(out, lock, {}, set())
    # Another driver judged us dead (paused past the TTL) and took over.
    out.write_json(epoch_path(lock.epoch + 1), {"holder": "other", "host": "elsewhere", "pid": 5,
                                                "heartbeat_at": time.time(), "ttl_s": 60})
    with pytest.raises(LockLost, match="pid 5 on elsewhere"):
        committer.commit(Task(SHARD), staged(out, "a1"), current="a1", attempts=1)
    assert not out.exists(layout.data_path(SHARD.shard_id))
    assert not out.exists(layout.done_path(SHARD.shard_id))
    with pytest.raises(LockLost):
        committer.clear_staging()
    assert out.exists(layout.staged_path(SHARD.shard_id, "a1"))  # the new holder's to clear


def test_a_kill_after_a_replaced_marker_never_leaves_a_stale_index(tmp_path):
    """--retry-failed replaces markers; a kill before the next index write must not leave the
    old markers in the index for the next run to trust."""
    out = output_storage(parse_spec(spec_dict("in", str(tmp_path / "out"), "m")))
    first = Committer(out, None, {}, set())
    first.commit(Task(SHARD), {**staged(out, "a1"), "errors": 3}, current="a1", attempts=1)
    first.write_index()
    assert load_markers(out, {SHARD.shard_id})[SHARD.shard_id]["errors"] == 3

    retry = Committer(out, None, load_markers(out, {SHARD.shard_id}), set())
    retry.forget_completion(markers_change=True)  # what prepare does for --retry-failed
    retry.commit(Task(SHARD, redo_errors=layout.data_path(SHARD.shard_id)), staged(out, "a2"),
                 current="a2", attempts=1)
    # Killed here: no index write at exit.
    marker = load_markers(out, {SHARD.shard_id})[SHARD.shard_id]
    assert marker["errors"] == 0 and marker["errors_before_retry"] == 3


def test_the_index_is_rewritten_when_a_marker_is_replaced(tmp_path, monkeypatch):
    import batchgen.job.commit as commit

    out = output_storage(parse_spec(spec_dict("in", str(tmp_path / "out"), "m")))
    c = Committer(out, None, {}, set())
    c.commit(Task(SHARD), {**staged(out, "a1"), "errors": 3}, current="a1", attempts=1)
    c.write_index()
    c.commit(Task(SHARD, redo_errors="x"), staged(out, "a2"), current="a2", attempts=1)
    monkeypatch.setattr(commit, "INDEX_EVERY_S", 0.0)
    c.maybe_write_index()  # the marker count did not change, but a marker did
    out.remove(layout.done_path(SHARD.shard_id))  # so only the index can answer
    assert load_markers(out, {SHARD.shard_id})[SHARD.shard_id]["errors"] == 0


def _completed_echo_job(tmp_path, prompts_dir, errors: int):
    raw = spec_dict(str(prompts_dir), str(tmp_path / "out"), "m",
                    model={"path": "none", "engine": "echo"}, resources={"shard_rows": 40})
    spec = parse_spec(raw)
    out = output_storage(spec)
    plan = make_plan(spec)
    out.write_json(layout.JOB, _job_doc(spec, plan))
    out.write_json(layout.PLAN, plan.to_json())
    for s in plan.shards:
        out.write_json(layout.done_path(s.shard_id), {
            "shard_id": s.shard_id, "file": layout.data_path(s.shard_id), "rows": s.row_count,
            "outputs": s.row_count, "errors": errors, "prompt_tokens": 1, "generated_tokens": 1})
    out.write_json(layout.STATUS, {"state": "completed", "shards": {"total": len(plan.shards)},
                                   "request_counts": {}})
    out.write_json(layout.MANIFEST, {})
    out.write_bytes(layout.SUCCESS, b"")
    return spec, out


def test_a_new_run_with_work_to_do_is_not_reported_completed(tmp_path, prompts_dir):
    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=2)
    with JobLock(out) as lock:
        job = prepare(spec, spec, out, lock, force=False, retry_failed=True, say=quiet)
    assert job.tasks and all(t.redo_errors for t in job.tasks)
    assert not out.exists(layout.SUCCESS) and not out.exists(layout.MANIFEST)
    out.write_json(layout.STATUS, job.progress.status())  # what execute writes first
    assert read_status(spec.output.path)["state"] != "completed"


def test_a_run_with_nothing_to_do_keeps_the_completion(tmp_path, prompts_dir):
    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    with JobLock(out) as lock:
        job = prepare(spec, spec, out, lock, force=False, retry_failed=True, say=quiet)
    assert job.tasks == [] and out.exists(layout.SUCCESS)


def test_a_failed_retry_points_at_resume_with_retry_failed():
    from batchgen.job.prepare import resume_command

    spec = parse_spec(spec_dict("in", "s3://b/out", "m", storage={"endpoint_url": "http://e"}))
    assert resume_command(spec) == "batchgen resume s3://b/out --endpoint-url http://e"
    assert resume_command(spec, retry_failed=True).endswith(" --retry-failed")


def test_run_against_an_address_where_nothing_listens_fails_fast(tmp_path, prompts_dir,
                                                                 monkeypatch):
    import ray
    from conftest import free_port

    from batchgen.job.driver import run_job

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `batchgen run`
    spec = parse_spec(spec_dict(str(prompts_dir), str(tmp_path / "out"), "m",
                                model={"path": "none", "engine": "echo"}))
    started = time.monotonic()
    with pytest.raises(BatchgenError, match="nothing answers at 127.0.0.1"):
        run_job(spec, address=f"127.0.0.1:{free_port()}", live=False, log=quiet)
    print(f"unreachable address refused in {time.monotonic() - started:.2f} s")
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and "nothing answers" in status["error"]
    lock_docs = list((tmp_path / "out" / "_batchgen" / "lock").iterdir())
    assert all(json.loads(p.read_text()).get("released_at") for p in lock_docs)


@pytest.mark.slow
def test_sigterm_while_planning_releases_the_lock(tmp_path, prompts_dir):
    """The stop handler is in place before planning: a stop there is a clean cancel."""
    job = tmp_path / "job.json"
    out = tmp_path / "out"
    job.write_text(json.dumps(spec_dict(str(prompts_dir), str(out), "m",
                                        model={"path": "none", "engine": "echo"})))
    script = (
        "import sys, time\n"
        "import batchgen.job.prepare as p\n"
        "def slow(spec):\n"
        "    print('planning', flush=True)\n"
        "    time.sleep(120)\n"
        "p.make_plan = slow\n"
        "from batchgen.cli import main\n"
        f"main(['run', {str(job)!r}, '--no-progress'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "planning"
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    assert "cancelled while preparing the run; no shard ran" in text
    docs = [json.loads(p.read_text()) for p in (out / "_batchgen" / "lock").iterdir()]
    assert docs and all(d.get("released_at") for d in docs)
    assert not (out / "job.json").exists()


def test_the_driver_imports_no_torch():
    code = ("import sys, batchgen.job.driver, batchgen.job.prepare, batchgen.job.commit; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_failure_while_preparing_leaves_a_final_status(tmp_path, prompts_dir, monkeypatch):
    from batchgen.job import prepare as prep

    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    for name in (layout.STATUS, layout.SUCCESS, layout.MANIFEST):  # a job not finished yet
        out.remove(name)

    def unreadable(*a):
        raise OSError("storage went away")

    monkeypatch.setattr(prep, "load_markers", unreadable)
    with JobLock(out) as lock:
        with pytest.raises(OSError):
            prepare(spec, spec, out, lock, force=False, retry_failed=False, say=quiet)
    status = read_status(spec.output.path)
    assert status["state"] == "failed" and "storage went away" in status["error"]


def test_a_retry_run_writes_the_index_only_at_its_end(tmp_path, monkeypatch):
    """A replaced marker must never sit in an index older than it when the driver is killed:
    a retry run (markers replaced) writes the index at its end only, not every minute."""
    import batchgen.job.commit as commit

    out = output_storage(parse_spec(spec_dict("in", str(tmp_path / "out"), "m")))
    first = Committer(out, None, {}, set())
    first.commit(Task(SHARD), {**staged(out, "a1"), "errors": 3}, current="a1", attempts=1)
    first.write_index(final=True)
    retry = Committer(out, None, load_markers(out, {SHARD.shard_id}), set())
    retry.forget_completion(markers_change=True)
    monkeypatch.setattr(commit, "INDEX_EVERY_S", 0.0)
    retry.commit(Task(SHARD, redo_errors="x"), {**staged(out, "a2"), "errors": 1}, current="a2",
                 attempts=1)
    retry.maybe_write_index()
    assert not out.exists(layout.INDEX)  # a kill here: the markers are the truth
    retry.commit(Task(SHARD, redo_errors="x"), staged(out, "a3"), current="a3", attempts=1)
    retry.write_index(final=True)
    out.remove(layout.done_path(SHARD.shard_id))
    assert load_markers(out, {SHARD.shard_id})[SHARD.shard_id]["errors"] == 0


def test_a_corrupt_done_marker_is_named(tmp_path):
    out = output_storage(parse_spec(spec_dict("in", str(tmp_path / "out"), "m")))
    out.write_bytes(layout.done_path("000003"), b"{not json")
    with pytest.raises(BatchgenError, match="000003.json: not a batchgen done marker"):
        load_markers(out, {"000003"})
    out.write_json(layout.done_path("000003"), {"shard_id": "000003"})
    with pytest.raises(BatchgenError, match="missing file, rows"):
        load_markers(out, {"000003"})


def test_force_writes_nothing_until_the_model_check_passes(tmp_path, prompts_dir):
    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    before = out.read_bytes(layout.JOB)
    raw = json.loads(json.dumps(spec.model_dump(mode="json")))
    raw["generation"]["max_new_tokens"] = 7
    raw["model"] = {"path": str(tmp_path / "no-such-model")}
    with JobLock(out) as lock, pytest.raises(BatchgenError, match="no-such-model"):
        prepare(parse_spec(raw), parse_spec(raw), out, lock, force=True, retry_failed=False,
                say=quiet)
    assert out.read_bytes(layout.JOB) == before


@pytest.mark.parametrize("version", [1, 2])
def test_a_plan_of_an_earlier_engine_resumes_only_with_force(tmp_path, prompts_dir, version):
    """Plans of fingerprint versions 1 and 2 were made by engine version 1, whose sampled text
    differs: resuming one would mix two streams, so it needs --force, and says why."""
    from batchgen.engine.versions import ENGINE_VERSION
    from batchgen.job.fingerprint import FINGERPRINT_VERSION, current_fingerprint, digest as _digest
    from batchgen.job.plan import Plan

    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    old = out.read_json(layout.PLAN)
    if version == 1:
        del old["fingerprint_version"]  # as batchgen wrote it before fingerprint version 2
    else:
        old["fingerprint_version"] = 2
    old["fingerprint_parts"] = current_fingerprint(spec, version=version)[1]
    assert "engine" not in old["fingerprint_parts"]
    old["fingerprint"] = _digest(old["fingerprint_parts"])
    out.write_json(layout.PLAN, old)
    with JobLock(out) as lock, pytest.raises(BatchgenError, match=r"changed: the engine's "
                                             r"version .*differs from the committed.*--force"):
        prepare(spec, spec, out, lock, force=False, retry_failed=False, say=quiet)
    with JobLock(out) as lock:
        job = prepare(spec, spec, out, lock, force=True, retry_failed=False, say=quiet)
    assert job.tasks == []
    stored = Plan.from_json(out.read_json(layout.PLAN))
    assert stored.fingerprint_version == FINGERPRINT_VERSION
    assert stored.fingerprint_parts["engine"] == str(ENGINE_VERSION)
    assert stored.shards == job.plan.shards and stored.fingerprint == current_fingerprint(spec)[0]
    assert out.read_json(layout.JOB)["forced_from"] == old["fingerprint"]
    with JobLock(out) as lock:  # from now on it resumes without --force
        assert prepare(spec, spec, out, lock, force=False, retry_failed=False, say=quiet).tasks == []

    newer = {**out.read_json(layout.PLAN), "fingerprint_version": FINGERPRINT_VERSION + 1}
    out.write_json(layout.PLAN, newer)
    with JobLock(out) as lock, pytest.raises(BatchgenError, match="written by a newer batchgen"):
        prepare(spec, spec, out, lock, force=True, retry_failed=False, say=quiet)


def test_a_driver_taken_over_leaves_the_status_to_the_new_holder(tmp_path, prompts_dir):
    from batchgen.job.driver import _final_status

    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=2)
    lock = JobLock(out, beat_s=3600)
    lock.acquire()
    job = prepare(spec, spec, out, lock, force=False, retry_failed=True, say=quiet)
    out.write_json(epoch_path(lock.epoch + 1), {"holder": "new", "host": "elsewhere", "pid": 5,
                                                "heartbeat_at": time.time(), "ttl_s": 60})
    out.write_json(layout.STATUS, {"state": "in_progress", "by": "the new holder"})
    with pytest.raises(LockLost):
        job.committer.record_failure(job.tasks[0], 3, "boom")
    _final_status(job, lock, "failed", "stopping: the lock was taken over")
    job.committer.write_index(final=True)
    assert out.read_json(layout.STATUS)["by"] == "the new holder"
    assert not out.exists(layout.failed_path(job.tasks[0].shard.shard_id))
    assert not out.exists(layout.INDEX)
    lock.release()


def test_a_refused_resume_names_the_keys_and_files_that_changed(tmp_path, prompts_dir):
    # It named only the section ("changed: generation"), and for input.completion_column the
    # fingerprint's part ("prompt").
    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    raw = json.loads(json.dumps(spec.model_dump(mode="json")))
    raw["mode"] = "score"
    raw["input"]["completion_column"] = "topic"
    raw["generation"]["max_new_tokens"] = 40
    raw["output"]["parse"] = "json"
    changed = parse_spec(raw)
    with JobLock(out) as lock, pytest.raises(BatchgenError) as e:
        prepare(changed, changed, out, lock, force=False, retry_failed=False, say=quiet)
    assert ("holds a different job (changed: input.completion_column (None -> 'topic'); mode "
            "('generate' -> 'score'); generation.max_new_tokens (12 -> 40); output.parse ('none' "
            "-> 'json')); use a new output.path") in str(e.value)
    # An input file rewritten in place is named too.
    pq.write_table(pq.read_table(prompts_dir / "part-1.parquet").slice(1), prompts_dir / "part-1.parquet")
    with JobLock(out) as lock, pytest.raises(BatchgenError, match=r"changed: input files \(\S*"
                                             r"part-1.parquet changed\)"):
        prepare(spec, spec, out, lock, force=False, retry_failed=False, say=quiet)


def test_a_finished_run_has_no_shard_running():
    # status.json of completed outputs said "running": 1: the last count the scheduler fed.
    from batchgen.job.progress import JobProgress

    progress = JobProgress(name=None, output="o", total_shards=3, total_rows=3, n=1)
    progress.start()
    progress.running = 2
    for state in ("completed", "failed", "cancelled"):
        progress.finish(state)
        assert progress.status()["shards"]["running"] == 0


@pytest.mark.parametrize("damage", [b'{"spec": {"generation"', b"\xff\xfe not UTF-8", b"[1, 2]"])
def test_a_damaged_job_json_still_lets_a_refused_resume_say_what_changed(tmp_path, prompts_dir,
                                                                        damage):
    # The keys that changed are read from job.json; a damaged one (a truncated write, another
    # tool's file) made the refusal a JSONDecodeError traceback, --force included.
    spec, out = _completed_echo_job(tmp_path, prompts_dir, errors=0)
    (tmp_path / "out" / "job.json").write_bytes(damage)
    raw = json.loads(json.dumps(spec.model_dump(mode="json")))
    raw["generation"]["seed"] = 99
    changed = parse_spec(raw)
    with JobLock(out) as lock, pytest.raises(BatchgenError, match=r"holds a different job "
                                             r"\(changed: generation\)"):
        prepare(changed, changed, out, lock, force=False, retry_failed=False, say=quiet)
    with JobLock(out) as lock:
        job = prepare(changed, changed, out, lock, force=True, retry_failed=False, say=quiet)
    assert job.tasks == [] and out.read_json(layout.JOB)["spec"]["generation"]["seed"] == 99
