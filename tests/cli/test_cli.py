import json
import os
import subprocess
import sys
import types

import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, free_port, spec_dict

from batchgen.cli import main


def write_job(tmp_path, raw) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_help_lists_commands_and_flags_name_their_keys():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("run", "plan", "status", "show", "init-model"):
        assert cmd in r.output
    r = CliRunner().invoke(main, ["run", "--help"])
    assert "Overrides resources.replicas" in r.output and "Overrides output.path" in r.output


def test_bad_spec_is_one_clean_line_and_exit_2(tmp_path, prompts_dir):
    raw = spec_dict(str(prompts_dir), str(tmp_path / "out"), "m", generation={"top_p": 1.5})
    job = write_job(tmp_path, raw)
    r = CliRunner().invoke(main, ["run", job])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {job}: generation.top_p: Input should be less than or equal to 1, got 1.5"
    assert "Traceback" not in r.output


def test_missing_input_and_bad_override(tmp_path):
    job = write_job(tmp_path, spec_dict(str(tmp_path / "nope"), str(tmp_path / "out"), "m"))
    r = CliRunner().invoke(main, ["plan", job])
    assert r.exit_code == 2 and f"input.path {tmp_path / 'nope'}: no such file or directory" in r.output
    r = CliRunner().invoke(main, ["plan", job, "--set", "resources.shard_rows=-3"])
    assert r.exit_code == 2 and "resources.shard_rows: Input should be greater than or equal to 1, got -3" in r.output


def test_plan_shows_shards_and_token_estimate(tmp_path, prompts_dir, tiny_model):
    job = write_job(tmp_path, spec_dict(str(prompts_dir), str(tmp_path / "out"), tiny_model))
    r = CliRunner().invoke(main, ["plan", job, "--json", "--set", "resources.shard_rows=20"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["rows"] == 80 and summary["files"] == 3 and summary["shards"] == 5
    assert 5 < summary["prompt_tokens_per_row"] < 40
    assert not (tmp_path / "out").exists()  # planning writes nothing
    r = CliRunner().invoke(main, ["plan", job])
    assert "80 rows" in r.output and "000000" in r.output


def test_status_of_missing_output(tmp_path):
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert r.exit_code == 2 and "no batchgen job here" in r.output


def test_status_without_an_address_reads_an_output(monkeypatch, tmp_path):
    # A bare name is looked up as a Ray job only when a cluster address is given.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = CliRunner().invoke(main, ["status", "typo-out"])
    assert r.exit_code == 2 and "typo-out: no batchgen job here" in r.output


def test_submit_refuses_bad_specs_before_contacting_a_cluster(tmp_path, prompts_dir, tiny_model):
    # The address has nothing listening: each error must come from the checks done before.
    nowhere = ["--address", f"http://127.0.0.1:{free_port()}"]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict(str(prompts_dir), str(tmp_path / "o"), tiny_model,
                                            generation={"top_p": 1.5})))
    r = CliRunner().invoke(main, ["submit", str(job), *nowhere])
    assert r.exit_code == 2 and "generation.top_p" in r.output

    job.write_text(yaml.safe_dump(spec_dict(
        "s3://b/in", "s3://b/out", tiny_model, storage={"options": {"secret": "hunter2"}})))
    r = CliRunner().invoke(main, ["submit", str(job), *nowhere])
    assert r.exit_code == 2
    assert "storage.options: credentials do not belong in the spec (storage.options.secret)" in r.output
    assert "hunter2" not in r.output

    job.write_text(yaml.safe_dump(spec_dict(str(prompts_dir), str(tmp_path / "o"), tiny_model)))
    r = CliRunner().invoke(main, ["submit", str(job), *nowhere, "--env", "BG_SURELY_UNSET"])
    assert r.exit_code == 2 and "--env BG_SURELY_UNSET: not set in this environment" in r.output
    r = CliRunner().invoke(main, ["submit", str(job), *nowhere])
    assert r.exit_code == 2 and "cannot reach the Ray Jobs API" in r.output


@pytest.mark.slow
def test_init_model_builds_a_loadable_model(tmp_path):
    r = CliRunner().invoke(main, ["init-model", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "llama"
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template


@pytest.mark.slow
@pytest.mark.ray
def test_real_subprocess_run_then_status_and_show(tmp_path, prompts_dir, tiny_model):
    out = tmp_path / "out"
    job = write_job(tmp_path, spec_dict(str(prompts_dir), str(out), tiny_model))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [str(BIN / "batchgen"), "run", job, "--replicas", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed: 80 rows, 80 outputs (0 errors)" in proc.stdout
    assert "[in_progress] shards 7/7, rows 80/80" in proc.stderr  # log lines when not a TTY
    r = CliRunner().invoke(main, ["status", str(out)])
    assert "state:    completed" in r.output and "shards:   7/7 committed" in r.output
    r = CliRunner().invoke(main, ["show", str(out), "-n", "3"])
    assert r.exit_code == 0 and r.output.startswith("r00000#0 [")
    assert len(r.output.strip().splitlines()) == 3


def test_import_cli_loads_no_heavy_modules():
    code = ("import sys, batchgen.cli; "
            "print([m for m in ('torch', 'transformers', 'ray', 'pyarrow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_cancels_cleanly_and_a_rerun_resumes(tmp_path, prompts_dir, tiny_model):
    import signal
    import time

    from conftest import wait_until

    out = tmp_path / "out"
    job = write_job(tmp_path, spec_dict(
        str(prompts_dir), str(out), tiny_model,
        generation={"max_new_tokens": 64},
        resources={"replicas": 1, "shard_rows": 3, "batch_size": 2},
    ))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [str(BIN / "batchgen"), "run", job, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    done = out / "_batchgen" / "done"
    wait_until(lambda: done.exists() and len(list(done.iterdir())) >= 1, timeout=120)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    # Ray's job stop sends SIGKILL 3 s after SIGTERM; a busy machine makes a wall-clock bound
    # flaky, so the time is reported (-s), and the exit code proves it was not a SIGKILL.
    print(f"SIGTERM -> exit in {time.monotonic() - sent:.2f} s")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "cancelled"
    committed = len(list(done.iterdir()))
    assert 1 <= committed < 28 and not (out / "_SUCCESS").exists()
    assert len(list((out / "data").iterdir())) == committed  # only complete, committed files

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {committed} of 28 shards already committed" in rerun.stdout
    import pyarrow.dataset as ds

    ids = ds.dataset(out / "data").to_table(columns=["row_id"]).column("row_id").to_pylist()
    assert sorted(ids) == [f"r{i:05d}" for i in range(80)]


def fake_driver(monkeypatch) -> list:
    """``batchgen.job.driver`` replaced by one whose run_job records the spec it was given."""
    specs: list = []
    driver = types.ModuleType("batchgen.job.driver")

    def run_job(spec, **kwargs):
        specs.append(spec)
        return types.SimpleNamespace(line=lambda: f"completed: -> {spec.output.path}")

    driver.run_job = run_job
    monkeypatch.setitem(sys.modules, "batchgen.job.driver", driver)
    return specs


def test_resume_drops_redacted_options_at_any_depth(tmp_path, monkeypatch):
    # job.json written before specs refused credentials holds "<redacted>" where they were;
    # handed to s3fs literally they would be used as the credentials.
    specs = fake_driver(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    options = {"anon": False, "key": "<redacted>",
               "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "<redacted>"}}
    raw = spec_dict("s3://b/in", "s3://b/elsewhere", "m", storage={"options": options})
    (out / "job.json").write_text(json.dumps({"spec": raw}))
    r = CliRunner().invoke(main, ["resume", str(out)])
    assert r.exit_code == 0, r.output
    (spec,) = specs
    assert spec.storage.options == {"anon": False, "client_kwargs": {"region_name": "eu-west-1"}}
    assert spec.output.path == str(out)


def test_show_escapes_control_characters_in_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    evil = "r1\x1b]0;owned\x07\x1b[2J\nfake line"
    pq.write_table(pa.table({"row_id": [evil, "plain"], "sample_index": [0, 0],
                             "finish_reason": ["stop", "stop"], "generation": ["hi\x1b[31m", "ok"],
                             "error": pa.array([None, None], pa.string())}),
                   tmp_path / "data" / "part-000000.parquet")
    r = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and r.output.count("\n") == 2
    assert r.output.splitlines() == [
        "'r1\\x1b]0;owned\\x07\\x1b[2J\\nfake line'#0 [stop] 'hi\\x1b[31m'",
        "plain#0 [stop] 'ok'",
    ]


class FakeJobsClient:
    """Ray's JobSubmissionClient as a head that has just started answers it."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        self.calls = 0

    def list_jobs(self):
        return []

    def submit_job(self, *, submission_id, **kwargs):
        self.calls += 1
        if self.failures:
            raise RuntimeError(self.failures.pop(0))
        return submission_id


def submit_to_fake(monkeypatch, tmp_path, failures: list[str], wait_s: float):
    from batchgen import submission

    client = FakeJobsClient(failures)

    def connect(self, address):
        self.address, self._had_token, self._token_source = address, False, "none"
        self.client = client

    monkeypatch.setattr(submission.Cluster, "__init__", connect)
    monkeypatch.setattr(submission, "AGENT_WAIT_S", wait_s)
    monkeypatch.setattr(submission, "AGENT_POLL_S", 0.01)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict("s3://b/in", "s3://b/out", "m")))
    r = CliRunner().invoke(main, ["submit", str(job), "--address", "http://127.0.0.1:8265"])
    return r, client


NO_AGENT = ("Request failed with status code 500: No available agent to submit job, please try "
            "again later..")


def test_submit_waits_for_a_fresh_heads_job_agent(monkeypatch, tmp_path):
    r, client = submit_to_fake(monkeypatch, tmp_path, [
        NO_AGENT, "Request failed with status code 500: No available agent to submit job."], 5.0)
    assert r.exit_code == 0, r.output
    assert client.calls == 3
    assert r.stdout.strip() == "batchgen-out-" + r.stdout.strip().split("-")[2] + "-1"
    assert r.stderr.count("waiting for the cluster's job agent") == 1


def test_submit_gives_up_on_a_missing_job_agent_with_one_line(monkeypatch, tmp_path):
    r, client = submit_to_fake(monkeypatch, tmp_path, [NO_AGENT] * 1000, 0.05)
    assert r.exit_code == 2 and client.calls > 1
    assert r.stderr.splitlines()[-1].startswith(
        "error: http://127.0.0.1:8265: the cluster still has no job agent after 0s")
    # Any other refusal is reported at once.
    r, client = submit_to_fake(monkeypatch, tmp_path, ["Request failed: bad runtime_env"], 5.0)
    assert r.exit_code == 2 and client.calls == 1
    assert "waiting" not in r.output and "bad runtime_env" in r.output


def test_status_of_a_running_job_from_its_status_json(tmp_path):
    (tmp_path / "_batchgen" / "done").mkdir(parents=True)
    (tmp_path / "_batchgen" / "done" / "000000.json").write_text("{}")
    (tmp_path / "status.json").write_text(json.dumps({
        "state": "in_progress", "shards": {"total": 4, "completed": 0, "failed": 0, "running": 2},
        "request_counts": {"total": 40, "completed": 10, "failed": 0},
        "tokens": {"prompt": 50, "generated": 120}, "tokens_per_second": 12.5,
        "eta_seconds": 30.4, "error": None}))
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "state:    in_progress", "shards:   1/4 committed, 0 failed",
        "requests: 10/40 completed, 0 failed", "tokens:   120 generated, 12.5 tok/s",
        "eta:      30s"]


def test_show_with_more_rows_than_any_output_shows_them_all(tmp_path):
    # -n 99999999999999999999 ended in an OverflowError traceback (pyarrow's int64 slice).
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "out" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"row_id": ["a", "b"], "sample_index": [0, 0],
                             "finish_reason": ["stop", "stop"], "generation": ["x", "y"],
                             "error": [None, None]}),
                   tmp_path / "out" / "data" / "part-000000.parquet")
    r = CliRunner().invoke(main, ["show", str(tmp_path / "out"), "-n", "99999999999999999999"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["a#0 [stop] 'x'", "b#0 [stop] 'y'"]


def test_a_local_ray_that_cannot_start_is_one_error_line(tmp_path, prompts_dir, monkeypatch):
    # On a busy machine Ray's own start-up can time out; that printed a traceback, exit 1.
    import ray

    def slow_start(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the local Ray, not a cluster to join
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_start)
    out = tmp_path / "out"
    job = write_job(tmp_path, spec_dict(str(prompts_dir), str(out), "m",
                                        model={"engine": "echo"}))
    r = CliRunner().invoke(main, ["run", job, "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [
        "error: could not start a local Ray: The current node timed out during startup. This "
        "could happen because some of the raylet failed to startup or the GCS has become "
        "overloaded. A busy machine can be too slow for Ray's start-up: run it again, or start "
        "Ray yourself (`ray start --head`) and pass --address"]
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_status_of_a_score_job_counts_tokens_scored():
    from batchgen.job.status import format_status

    st = {"state": "completed", "shards": {"total": 1, "completed": 1, "failed": 0},
          "request_counts": {"total": 2, "completed": 2, "failed": 0},
          "tokens": {"prompt": 10, "generated": 0, "scored": 12}, "tokens_per_second": 6.0}
    assert "tokens:   12 scored, 6.0 tok/s" in format_status(st)
    st["tokens"] = {"prompt": 10, "generated": 30}  # a generation job, or one before scored
    assert "tokens:   30 generated, 6.0 tok/s" in format_status(st)
