"""Driver scale with the no-model engine (model.engine: echo).

- shards scheduled and committed per second, and the driver's peak memory, for jobs of 1k and
  10k one-row shards on local disk (2 replicas, each run in its own process);
- the time to resume a job with all but 1% of its shards done: 100k shards on local disk, and
  on moto's S3 server on 127.0.0.1 (the done markers of the 99% are written by this script).

    python benchmarks/bench_driver.py [--quick] [--resume-shards N] [--s3-resume-shards N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, cpu_pressure, emit, environment, log

RUN = r"""
import json, resource, sys, time
from batchgen.job.driver import run_job
from batchgen.spec.load import parse_spec
spec = parse_spec(json.loads(sys.argv[1]))
t0 = time.perf_counter()
summary = run_job(spec, live=False, log=lambda line: print(line, file=sys.stderr, flush=True))
print(json.dumps({"seconds": time.perf_counter() - t0, "state": summary.state,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_input(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i:07d}" for i in range(rows)],
                             "prompt": [f"row {i}" for i in range(rows)]}), path,
                   row_group_size=1000)


def spec_raw(inp: str, out: str, storage: dict | None = None) -> dict:
    return {
        "input": {"path": inp, "id_column": "id"},
        "model": {"path": "none", "engine": "echo"},
        "generation": {"max_new_tokens": 1},
        "output": {"path": out},
        "resources": {"replicas": 2, "shard_rows": 1, "max_attempts": 1},
        "storage": storage or {},
    }


def run(raw: dict, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(raw)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(tmp: Path, shards: int) -> None:
    inp = tmp / f"in-{shards}.parquet"
    make_input(inp, shards)
    log(f"driver: {shards} one-row shards, echo engine, 2 replicas")
    out = tmp / f"out-{shards}"
    result = run(spec_raw(str(inp), str(out)))
    # Steady state from the commit times: from the 10th to the 100th percentile of commits.
    from datetime import datetime

    times = sorted(datetime.fromisoformat(json.loads(p.read_text())["committed_at"]).timestamp()
                   for p in (out / "_batchgen" / "done").iterdir())
    first = times[len(times) // 10]
    steady = (len(times) - len(times) // 10) / max(times[-1] - first, 1.0)
    emit(bench="driver", shards=shards, seconds=round(result["seconds"], 1),
         shards_per_s_wall=round(shards / result["seconds"], 1),
         shards_per_s_steady=round(steady, 1),
         driver_max_rss_mb=round(result["max_rss_mb"], 1),
         note="2 replicas, echo engine, local disk; wall incl. Ray start")


def prepare_resume(raw: dict, done_fraction: float, put) -> int:
    """Plan the job and write done markers for all but the last 1% of shards, as a long run
    that died near its end would have left them."""
    from batchgen.job.plan import make_plan
    from batchgen.job.prepare import _job_doc
    from batchgen.spec.load import parse_spec

    spec = parse_spec(raw)
    plan = make_plan(spec)
    put("job.json", json.dumps(_job_doc(spec, plan)).encode())
    put("plan.json", json.dumps(plan.to_json()).encode())
    done = plan.shards[: int(len(plan.shards) * done_fraction)]

    def marker(s):
        put(f"_batchgen/done/{s.shard_id}.json", json.dumps({
            "shard_id": s.shard_id, "attempt": "prepared", "rows": 1, "outputs": 1, "errors": 0,
            "prompt_tokens": 2, "generated_tokens": 1, "seconds": 0.01, "host": "bench",
            "file": f"data/part-{s.shard_id}.parquet", "attempts": 1,
            "committed_at": "2026-01-01T00:00:00+00:00"}).encode())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(marker, done))
    # The index a driver writes every minute: here it misses the last 1% of the commits, as if
    # the driver was killed shortly before its next write.
    import gzip

    indexed = done[: int(len(plan.shards) * (done_fraction - 0.01))]
    put("_batchgen/done-index.json.gz", gzip.compress(json.dumps([
        {"shard_id": s.shard_id, "attempt": "prepared", "rows": 1, "outputs": 1, "errors": 0,
         "prompt_tokens": 2, "generated_tokens": 1, "seconds": 0.01, "host": "bench",
         "file": f"data/part-{s.shard_id}.parquet", "attempts": 1,
         "committed_at": "2026-01-01T00:00:00+00:00"} for s in indexed]).encode()))
    return len(plan.shards) - len(done)


def resume_local(tmp: Path, shards: int) -> None:
    inp, out = tmp / f"in-r{shards}.parquet", tmp / f"out-r{shards}"
    make_input(inp, shards)
    raw = spec_raw(str(inp), str(out))

    def put(rel, data):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    left = prepare_resume(raw, 0.99, put)
    log(f"resume: {shards} shards, {left} left, local disk")
    result = run(raw)
    emit(bench="resume", storage="local", shards=shards, left=left,
         seconds=round(result["seconds"], 1), driver_max_rss_mb=round(result["max_rss_mb"], 1))


def resume_s3(tmp: Path, shards: int) -> None:
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        inp = tmp / f"in-s3-{shards}.parquet"
        make_input(inp, shards)
        raw = spec_raw(str(inp), "s3://bench/out", {"endpoint_url": endpoint})
        t0 = time.perf_counter()
        left = prepare_resume(raw, 0.99, lambda rel, data: client.put_object(
            Bucket="bench", Key=f"out/{rel}", Body=data))
        log(f"resume: {shards} shards, {left} left, moto S3 (set-up {time.perf_counter() - t0:.0f} s)")
        result = run(raw, env)
        emit(bench="resume", storage="moto-s3", shards=shards, left=left,
             seconds=round(result["seconds"], 1), driver_max_rss_mb=round(result["max_rss_mb"], 1))
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume-shards", type=int, default=100_000)
    # moto takes ~180 PUT/s here, so writing 99k markers would take ~9 minutes: 10k by default.
    ap.add_argument("--s3-resume-shards", type=int, default=10_000)
    args = ap.parse_args()
    pressure_start = cpu_pressure()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="bg-driver-") as tmp:
        tmp = Path(tmp)
        for shards in ((200,) if args.quick else (1_000, 10_000)):
            throughput(tmp, shards)
        resume_local(tmp, 2_000 if args.quick else args.resume_shards)
        resume_s3(tmp, 2_000 if args.quick else args.s3_resume_shards)
    environment(pressure_start)


if __name__ == "__main__":
    main()
