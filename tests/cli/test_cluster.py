"""Submission to a real multi-node Ray cluster through the Jobs API.

One cluster for the module, started by ``cluster/local-cluster.sh`` exactly as a user would: a
head with the dashboard (no CPUs, so no replica lands there) and two worker nodes, all on
127.0.0.1 with their own RAY_TMPDIR, token authentication on with a token made for this test,
and HOME pointed at a scratch folder so nothing touches ``~/.ray``. The cluster's environment has
no AWS credentials: the jobs get them from ``submit --env`` alone. Input, output and (in one
test) the model live on the moto S3 server. Teardown kills only this cluster's processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pyarrow.parquet as pq
import pytest
import s3fs

from conftest import BIN, REPO, free_port, prompt_table, spec_dict, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]

SECRET = f"bgsecret-{uuid.uuid4().hex}"  # the AWS secret key the jobs are given
TOKEN = f"bgtoken-{uuid.uuid4().hex}"  # the cluster's Ray auth token
JOB_ID = re.compile(r"^batchgen-[a-z0-9-]+-[0-9a-f]{8}-\d+$")


class LocalCluster:
    def __init__(self, state, home):
        self.dash = free_port()
        self.gcs = free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "RAY_"))}
        base["PATH"] = f"{BIN}:{os.environ['PATH']}"
        self.cluster_env = {
            **base, "HOME": str(home), "RAY_AUTH_TOKEN": TOKEN, "STATE_DIR": str(state),
            "RAY_PORT": str(self.gcs), "DASHBOARD_PORT": str(self.dash), "WORKERS": "2",
            "CPUS_PER_WORKER": "1", "RAY": str(BIN / "ray"),
        }
        # The user's laptop: the token, and the storage credentials to hand to the job.
        self.user_env = {**base, "RAY_AUTH_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "bgkey",
                         "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def script(self, verb: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "cluster" / "local-cluster.sh"), verb],
                              env=self.cluster_env, capture_output=True, text=True, timeout=180)

    def batchgen(self, *args, env: dict | None = None, timeout: float = 300):
        return subprocess.run([str(BIN / "batchgen"), *args], env=env or self.user_env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def worker_nodes(self) -> set[str]:
        r = subprocess.run(
            [str(BIN / "ray"), "list", "nodes", "--address", self.address, "--format", "json"],
            env={**self.user_env, "RAY_AUTH_MODE": "token"},
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        nodes = json.loads(r.stdout)
        return {n["node_id"] for n in nodes if not n.get("is_head_node") and n["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster-state"), tmp_path_factory.mktemp("home"))
    up = c.script("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert TOKEN not in up.stdout + up.stderr
        yield c
    finally:
        down = c.script("down")
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import boto3

    name = f"bg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    with fs.open(f"{name}/in/prompts.parquet", "wb") as f:
        pq.write_table(prompt_table(48), f, row_group_size=8)
    return name


def write_job(tmp_path, s3_endpoint, bucket, out, model_path, **sections) -> str:
    raw = spec_dict(f"s3://{bucket}/in/prompts.parquet", f"s3://{bucket}/{out}", model_path,
                    storage={"endpoint_url": s3_endpoint}, **sections)
    cluster_shape = {"replicas": 2, "cpus_per_replica": 1, "shard_rows": 8}
    raw["resources"].update({k: v for k, v in cluster_shape.items()
                             if k not in sections.get("resources", {})})
    path = tmp_path / f"{out}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return str(path)


SUBMIT_ENV = ["--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY",
              "--env", "AWS_DEFAULT_REGION"]


def read_output(fs, url) -> list[dict]:
    rows = []
    for name in sorted(fs.ls(f"{url}/data", refresh=True)):
        with fs.open(name, "rb") as f:
            rows += pq.ParquetFile(f).read().to_pylist()
    return rows


def markers(fs, url) -> list[dict]:
    return [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(f"{url}/_batchgen/done", refresh=True))]


def assert_no_secrets(fs, url, *texts):
    fs.invalidate_cache()
    for path in fs.find(url):
        data = fs.cat_file(path)
        assert TOKEN.encode() not in data and SECRET.encode() not in data, path
    for text in texts:
        assert TOKEN not in text and SECRET not in text


# Shards of about a second each (one row at a time, 32 tokens): the replica whose node is slower
# to load the model still gets shards before the other has finished them all.
FIRST_JOB = {"generation": {"max_new_tokens": 32, "ignore_eos": True},
             "resources": {"batch_size": 1}}


@pytest.fixture(scope="module")
def first_job(cluster, bucket, s3_endpoint, tiny_model, tmp_path_factory):
    """`batchgen submit --wait` of a job with the tiny model from a local folder."""
    job = write_job(tmp_path_factory.mktemp("jobs"), s3_endpoint, bucket, "out-local-model",
                    tiny_model, **FIRST_JOB)
    r = cluster.batchgen("submit", job, "--address", cluster.address, "--wait", *SUBMIT_ENV)
    return r, f"s3://{bucket}/out-local-model"


def test_submit_wait_runs_on_both_workers(cluster, first_job, s3_endpoint):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    r, url = first_job
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.splitlines()[0]
    assert JOB_ID.match(job_id) and job_id.endswith("-1")
    assert "completed: 48 rows, 48 outputs (0 errors)" in r.stdout

    # Row by row: every input row once, its columns carried over, a real generation.
    rows = read_output(fs, url)
    expected = {r["id"]: r for r in prompt_table(48).to_pylist()}
    assert sorted(r["row_id"] for r in rows) == sorted(expected)
    for row in rows:
        src = expected[row["row_id"]]
        assert (row["id"], row["topic"], row["prompt"]) == (src["id"], src["topic"], src["prompt"])
        assert row["error"] is None and row["finish_reason"] in ("stop", "length")
        assert row["generated_tokens"] > 0 and row["generation"] is not None

    # Replicas were spread: shards committed from both worker nodes, none from the head.
    done = markers(fs, url)
    assert len(done) == 6
    per_node = {n: sum(m["node_id"] == n for m in done) for n in {m["node_id"] for m in done}}
    assert set(per_node) == cluster.worker_nodes(), per_node

    status = cluster.batchgen("status", job_id, "--address", cluster.address)
    assert status.returncode == 0, status.stderr
    assert "ray:      SUCCEEDED" in status.stdout
    assert "state:    completed" in status.stdout
    assert "requests: 48/48 completed, 0 failed" in status.stdout
    logs = cluster.batchgen("logs", job_id, "--address", cluster.address)
    assert "completed: 48 rows" in logs.stdout
    listing = cluster.batchgen("list", "--address", cluster.address)
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s.*{url}$", listing.stdout, re.M), listing.stdout
    status_json = cluster.batchgen("status", job_id, "--address", cluster.address, "--json")
    assert json.loads(status_json.stdout)["status"]["state"] == "completed"

    # Neither the token nor the AWS secret is in any output object or anything printed.
    assert_no_secrets(fs, url, r.stdout, r.stderr, status.stdout, status_json.stdout,
                      logs.stdout, listing.stdout)


def test_stop_then_resubmit_resumes(cluster, bucket, s3_endpoint, tiny_model, tmp_path):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    job = write_job(tmp_path, s3_endpoint, bucket, "out-stop", tiny_model,
                    generation={"max_new_tokens": 96, "ignore_eos": True})
    url = f"s3://{bucket}/out-stop"
    with open(job) as f:
        raw = f.read().replace("shard_rows: 8", "shard_rows: 2")
    with open(job, "w") as f:
        f.write(raw)
    r = cluster.batchgen("submit", job, "--address", cluster.address, *SUBMIT_ENV)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()

    # While it runs, the same job again is refused by Ray: one driver per output.
    dup = cluster.batchgen("submit", job, "--address", cluster.address, *SUBMIT_ENV)
    assert dup.returncode == 2
    assert f"{job_id} writes {url}" in dup.stderr and "refused a second driver" in dup.stderr

    wait_until(lambda: fs.exists(f"{url}/_batchgen/done")
               and len(fs.ls(f"{url}/_batchgen/done", refresh=True)) >= 2, timeout=120, every=0.5)
    stop = cluster.batchgen("stop", job_id, "--address", cluster.address)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id}: STOPPED", stop.stdout
    status = cluster.batchgen("status", job_id, "--address", cluster.address)
    assert "ray:      STOPPED" in status.stdout and "state:    cancelled" in status.stdout
    kept = {p: fs.cat_file(p) for p in fs.ls(f"{url}/data", refresh=True)}
    assert 2 <= len(kept) < 24, "the stop came after the job had finished; nothing to resume"

    again = cluster.batchgen("submit", job, "--address", cluster.address, "--wait", *SUBMIT_ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[0] == job_id[:-1] + "2"
    rows = read_output(fs, url)
    assert sorted(r["row_id"] for r in rows) == [f"r{i:05d}" for i in range(48)]
    assert all(r["generated_tokens"] == 96 for r in rows)
    for path, data in kept.items():  # shards committed before the stop were not redone
        assert fs.cat_file(path) == data
    assert_no_secrets(fs, url, again.stdout, again.stderr, status.stdout)


def test_model_from_s3_is_cached_once_per_node(cluster, bucket, s3_endpoint, tiny_model,
                                               tmp_path, first_job):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.put(tiny_model.rstrip("/") + "/", f"{bucket}/models/tiny/", recursive=True)
    cache = tmp_path / "model-cache"
    job = write_job(tmp_path, s3_endpoint, bucket, "out-s3-model", f"s3://{bucket}/models/tiny",
                    model={"cache_dir": str(cache)}, **FIRST_JOB)
    r = cluster.batchgen("submit", job, "--address", cluster.address, "--wait", *SUBMIT_ENV)
    assert r.returncode == 0, r.stdout + r.stderr

    # The same text as the job that loaded the model from a local folder (greedy decoding).
    by_id = {r["row_id"]: r["generation"]
             for r in read_output(fs, f"s3://{bucket}/out-s3-model")}
    assert by_id == {r["row_id"]: r["generation"] for r in read_output(fs, first_job[1])}
    # Two replicas (on two nodes of this one host, sharing the cache folder) and the driver:
    # one full copy for the replicas, one config-only copy for the driver's checks.
    folders = sorted((p.name.endswith("-config"), p) for p in cache.iterdir() if p.is_dir())
    assert [config for config, _ in folders] == [False, True], folders
    assert (folders[0][1] / "model.safetensors").exists()
    assert not (folders[1][1] / "model.safetensors").exists()


def test_wrong_or_missing_token_fails_clearly(cluster, tmp_path, tiny_model, s3_endpoint, bucket):
    job = write_job(tmp_path, s3_endpoint, bucket, "out-never", tiny_model)
    wrong = {**cluster.user_env, "RAY_AUTH_TOKEN": "not-the-token"}
    r = cluster.batchgen("submit", job, "--address", cluster.address, env=wrong)
    assert r.returncode == 2
    assert "the cluster refused the token from RAY_AUTH_TOKEN" in r.stderr
    assert "not-the-token" not in r.stdout + r.stderr

    missing = {k: v for k, v in cluster.user_env.items() if k != "RAY_AUTH_TOKEN"}
    missing["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    r = cluster.batchgen("list", "--address", cluster.address, env=missing)
    assert r.returncode == 2
    assert "requires a token and none was found" in r.stderr
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert not fs.exists(f"{bucket}/out-never")


def test_unknown_job_id_and_unreachable_cluster(cluster):
    r = cluster.batchgen("status", "batchgen-nope-00000000-1", "--address", cluster.address)
    assert r.returncode == 2 and "no job batchgen-nope-00000000-1 on" in r.stderr
    r = cluster.batchgen("list", "--address", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr


def test_an_explicit_address_wins_over_ray_address(cluster, first_job):
    # RAY_ADDRESS in the environment overrode --address in Ray's Jobs SDK: `list --address A`
    # listed cluster B's jobs, and `stop` could act on the wrong cluster. Here RAY_ADDRESS names
    # a port where nothing answers, so only --address can give these answers.
    job_id = first_job[0].stdout.splitlines()[0]
    env = {**cluster.user_env, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    listing = cluster.batchgen("list", "--address", cluster.address, env=env)
    assert listing.returncode == 0 and job_id in listing.stdout, listing.stderr
    status = cluster.batchgen("status", job_id, "--address", cluster.address, env=env)
    assert status.returncode == 0 and "ray:      SUCCEEDED" in status.stdout, status.stderr
    logs = cluster.batchgen("logs", job_id, "--address", cluster.address, env=env)
    assert logs.returncode == 0 and "completed: 48 rows" in logs.stdout, logs.stderr
    stop = cluster.batchgen("stop", job_id, "--address", cluster.address, env=env)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id}: SUCCEEDED", stop.stderr
    # Without --address, RAY_ADDRESS is the cluster (and here nothing answers there).
    r = cluster.batchgen("list", env=env)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr
