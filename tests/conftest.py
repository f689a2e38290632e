"""Shared fixtures: the tiny model, a real S3 server on loopback, a local Ray, input data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Credentials for the S3 server on loopback only; set before Ray starts so replicas inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from batchgen.tinymodel import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server, as its own process on 127.0.0.1."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket; returns its s3:// URL."""
    import boto3

    name = f"bg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests; stops only what it started."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def prompt_table(n: int, start: int = 0) -> pa.Table:
    topics = ["rivers", "robots", "tea", "gardens", "the moon", "cities", "birds", "music"]
    return pa.table(
        {
            "id": [f"r{i:05d}" for i in range(start, start + n)],
            "prompt": [
                f"Write one sentence about {topics[i % len(topics)]}." + " Please." * (i % 7)
                for i in range(start, start + n)
            ],
            "topic": [topics[i % len(topics)] for i in range(start, start + n)],
        }
    )


@pytest.fixture
def prompts_dir(tmp_path) -> Path:
    """Three Parquet files of 23, 40 and 17 rows, in row groups of 10."""
    d = tmp_path / "in"
    d.mkdir()
    start = 0
    for i, n in enumerate([23, 40, 17]):
        pq.write_table(prompt_table(n, start), d / f"part-{i}.parquet", row_group_size=10)
        start += n
    return d


def spec_dict(input_path: str, output_path: str, model_path: str, **sections) -> dict:
    """A spec as raw YAML data; keyword arguments update whole sections."""
    raw = {
        "input": {"path": input_path, "prompt_column": "prompt", "id_column": "id",
                  "columns": ["id", "topic"]},
        "model": {"path": model_path},
        "generation": {"max_new_tokens": 12},
        "output": {"path": output_path},
        "resources": {"replicas": 2, "shard_rows": 16, "batch_size": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def wait_until(predicate, timeout: float = 60.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(every)
