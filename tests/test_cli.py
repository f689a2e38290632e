import json
import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from batchgen.cli import main
from conftest import BIN, free_port, spec_dict


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
    assert r.exit_code == 2 and "storage.options.secret: credentials in the spec" in r.output
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
    # Within Ray's job-stop grace: SIGKILL follows SIGTERM after 3 s.
    assert time.monotonic() - sent < 3.0, time.monotonic() - sent
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
