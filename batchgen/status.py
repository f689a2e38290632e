"""Reading a job's state from its output alone, with no cluster.

``status.json`` is written by the driver as it goes; the commit markers are the ground truth, so
shard counts are taken from one listing of ``_batchgen/done/`` and ``_batchgen/failed/``.
"""

from __future__ import annotations

from typing import Any

from batchgen.errors import StorageError
from batchgen.storage import Storage, storage_options


def read_status(output: str, endpoint_url: str | None = None) -> dict[str, Any]:
    out = Storage(output, storage_options(output, endpoint_url))
    status = out.read_json_or_none("status.json")
    plan = out.read_json_or_none("plan.json") if status is None else None
    if status is None and plan is None:
        raise StorageError(f"{output}: no batchgen job here (no status.json or plan.json)")
    done = out.list_names("_batchgen/done")
    failed = out.list_names("_batchgen/failed")
    if status is None:  # planned, but the driver never wrote a status
        total = len(plan["shards"])
        status = {
            "state": "validating",
            "shards": {"total": total, "running": 0},
            "request_counts": {"total": None, "completed": None, "failed": None},
        }
    status["shards"]["completed"] = len(done)
    status["shards"]["failed"] = len(failed)
    if out.exists("_SUCCESS"):
        status["state"] = "completed"
    return status


def head_rows(output: str, n: int, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The first ``n`` output rows, reading only the first committed files."""
    import pyarrow.parquet as pq

    out = Storage(output, storage_options(output, endpoint_url))
    names = [x for x in out.list_names("data") if x.endswith(".parquet")]
    if not names:
        raise StorageError(f"{output}: no committed output yet (data/ is empty)")
    rows: list[dict[str, Any]] = []
    for name in names:
        with out.open_read(f"data/{name}") as f:
            # pq.read_table on a Python file object aborts the process at exit (pyarrow 26)
            rows += pq.ParquetFile(f).read().slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def stored_spec(output: str, endpoint_url: str | None = None, overrides: list[str] | None = None):
    """The spec a job was started with, from its ``job.json``, for ``batchgen resume``.

    Credentials were redacted when it was written; they come from the environment again."""
    from batchgen.spec import apply_overrides, parse_spec

    out = Storage(output, storage_options(output, endpoint_url))
    job = out.read_json_or_none("job.json")
    if job is None:
        raise StorageError(f"{output}: no batchgen job here to resume (no job.json)")
    data = job["spec"]
    storage = data.setdefault("storage", {})
    storage["options"] = {k: v for k, v in (storage.get("options") or {}).items() if v != "<redacted>"}
    if endpoint_url and not storage.get("endpoint_url"):
        storage["endpoint_url"] = endpoint_url
    data["output"]["path"] = output  # where it was found, even if it was moved
    return parse_spec(apply_overrides(data, overrides or []), source=f"{output}/job.json")
