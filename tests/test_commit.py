"""The commit protocol and the run's preparation, without Ray: markers, index, completion, lock."""

import json
import signal
import subprocess
import sys
import time

import pytest

from batchgen import layout
from batchgen.commit import Committer, Task, load_markers
from batchgen.errors import BatchgenError
from batchgen.lock import JobLock, LockLost, epoch_path
from batchgen.plan import Shard, make_plan, output_storage
from batchgen.prepare import _job_doc, prepare
from batchgen.specfile import parse_spec
from batchgen.status import read_status
from conftest import spec_dict

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
    import batchgen.commit as commit

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
    from batchgen.prepare import resume_command

    spec = parse_spec(spec_dict("in", "s3://b/out", "m", storage={"endpoint_url": "http://e"}))
    assert resume_command(spec) == "batchgen resume s3://b/out --endpoint-url http://e"
    assert resume_command(spec, retry_failed=True).endswith(" --retry-failed")


def test_run_against_an_address_where_nothing_listens_fails_fast(tmp_path, prompts_dir,
                                                                 monkeypatch):
    import ray

    from batchgen.driver import run_job
    from conftest import free_port

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
        "import batchgen.prepare as p\n"
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
    assert "cancelled before any work started" in text
    docs = [json.loads(p.read_text()) for p in (out / "_batchgen" / "lock").iterdir()]
    assert docs and all(d.get("released_at") for d in docs)
    assert not (out / "job.json").exists()


def test_the_driver_imports_no_torch():
    code = ("import sys, batchgen.driver, batchgen.prepare, batchgen.commit; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_failure_while_preparing_leaves_a_final_status(tmp_path, prompts_dir, monkeypatch):
    from batchgen import prepare as prep

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
