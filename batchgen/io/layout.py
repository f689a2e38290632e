"""Every path inside a job's output, in one place (relative to ``output.path``).

```
job.json, plan.json, status.json, manifest.json, _SUCCESS
data/part-<shard>.parquet          committed outputs, one per shard
chunks/part-<shard>.parquet        window summaries of chunked long documents
_batchgen/lock/<epoch>.json        the driver lock, one document per holder
_batchgen/staging/<shard>/<attempt>[.chunks].parquet   attempts in flight
_batchgen/done/<shard>.json        commit markers
_batchgen/failed/<shard>.json      shards that ran out of attempts
_batchgen/done-index.json.gz       every done marker in one object (an optimisation)
```
"""

from __future__ import annotations

JOB = "job.json"
PLAN = "plan.json"
STATUS = "status.json"
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"

DATA = "data"
CHUNKS = "chunks"
INTERNAL = "_batchgen"
LOCK_DIR = f"{INTERNAL}/lock"  # one document per holder: <epoch>.json
LEGACY_LOCK = f"{INTERNAL}/lock.json"  # batchgen before lock epochs
STAGING = f"{INTERNAL}/staging"
DONE = f"{INTERNAL}/done"
FAILED = f"{INTERNAL}/failed"
INDEX = f"{INTERNAL}/done-index.json.gz"


def data_path(shard_id: str) -> str:
    return f"{DATA}/part-{shard_id}.parquet"


def chunks_path(shard_id: str) -> str:
    return f"{CHUNKS}/part-{shard_id}.parquet"


def chunks_of(data_file: str) -> str:
    """The window-summary file that belongs to a committed data file."""
    return data_file.replace(f"{DATA}/", f"{CHUNKS}/", 1)


def staging_dir(shard_id: str) -> str:
    return f"{STAGING}/{shard_id}"


def staged_path(shard_id: str, attempt: str, kind: str = "data") -> str:
    suffix = "" if kind == "data" else f".{kind}"
    return f"{STAGING}/{shard_id}/{attempt}{suffix}.parquet"


def done_path(shard_id: str) -> str:
    return f"{DONE}/{shard_id}.json"


def failed_path(shard_id: str) -> str:
    return f"{FAILED}/{shard_id}.json"


def shard_id_of(marker_name: str) -> str:
    """``000012.json`` -> ``000012``."""
    return marker_name.removesuffix(".json")
