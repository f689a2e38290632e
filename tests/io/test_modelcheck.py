"""The model's files as the driver reads them, without torch: a hub that cannot be reached."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from conftest import BIN, free_port, prompt_table


@pytest.fixture
def job(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(prompt_table(3), tmp_path / "in.parquet")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / "in.parquet")},
                                    "model": {"path": "example-org/never-downloaded"},
                                    "output": {"path": str(tmp_path / "out")}}))
    return str(path)


def plan(job, tmp_path, **env):
    # A hub on a loopback port where nothing answers: no traffic leaves the machine.
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run([str(BIN / "batchgen"), "plan", job], capture_output=True, text=True,
                          env=env, timeout=120)


def test_an_unreachable_hub_is_one_line_that_says_so_without_retries(job, tmp_path):
    # It retried for ~28 s, then said "no config.json" without a word about the network.
    r = plan(job, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Retrying" not in r.stderr, r.stderr
    assert lines[0].startswith("error: model.path example-org/never-downloaded: cannot reach the "
                               "Hugging Face Hub at http://127.0.0.1:")
    assert "to fetch config.json, and it is not in the local cache" in lines[0]


def test_offline_mode_says_the_file_is_not_cached(job, tmp_path):
    r = plan(job, tmp_path, HF_HUB_OFFLINE="1")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: model.path example-org/never-downloaded: HF_HUB_OFFLINE is set and config.json "
        "is not in the local Hugging Face cache; download the model first, or point model.path "
        "at a local directory or an s3:// one")


def test_a_hub_that_answers_but_fails_is_not_called_offline(job, tmp_path):
    # A mirror (or proxy) that accepts the connection and then fails the download: it was
    # reported as "HF_HUB_OFFLINE is set", which it was not.
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # (a 5xx would be retried for ~25 s first, as it should be)
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = plan(job, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: model.path example-org/never-downloaded: ")
    assert "HF_HUB_OFFLINE" not in error, error
    assert ("cannot fetch config.json from the Hugging Face Hub at http://127.0.0.1:" in error
            and "404 Not Found" in error and "not in the local cache" in error), error
