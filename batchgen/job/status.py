"""Reading a job's state from its output alone, with no cluster.

``status.json`` is written by the driver as it goes; the commit markers are the ground truth, so
shard counts are taken from one listing of ``_batchgen/done/`` and ``_batchgen/failed/``.

OUTPUT is whatever the user typed, so everything read here may be missing, damaged or written by
something else: each such case is a ``StorageError`` naming the file, never a traceback.
"""

from __future__ import annotations

from typing import Any

from batchgen.errors import StorageError
from batchgen.io import layout
from batchgen.io.storage import Storage, storage_options
from batchgen.spec.secrets import REDACTED

# Columns `batchgen show` prints; a Parquet file without them is not batchgen's.
SHOWN_COLUMNS = ("row_id", "sample_index", "finish_reason", "generation", "error")


def _output(output: str, endpoint_url: str | None) -> Storage:
    out = Storage(output, storage_options(output, endpoint_url))
    try:
        is_file = out.fs.isfile(out.root)
    except OSError:  # unreachable storage: the first read below says why
        is_file = False
    if is_file:
        raise StorageError(f"{output}: is a file, not a job's output directory")
    return out


def _read_json(out: Storage, name: str, shape: dict[str, type]) -> dict[str, Any] | None:
    """``name`` as a JSON object with keys of the types in ``shape``; None if it is absent."""
    where = out.url_of(name)
    try:
        doc = out.read_json_or_none(name)
    except ValueError as e:  # invalid JSON or not UTF-8
        raise StorageError(
            f"{where}: not valid JSON ({e}); it was damaged or is not batchgen's") from None
    except OSError as e:
        raise StorageError(f"{where}: cannot read it: {e.strerror or e}") from None
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise StorageError(f"{where}: expected a JSON object, got {type(doc).__name__}; it was "
                           "damaged or is not batchgen's")
    wrong = [k for k, t in shape.items() if not isinstance(doc.get(k), t)]
    if wrong:
        raise StorageError(f"{where}: missing or malformed {', '.join(wrong)}; it was damaged or "
                           "is not batchgen's")
    return doc


def _status_doc(out: Storage) -> dict[str, Any] | None:
    status = _read_json(out, layout.STATUS, {"state": str, "shards": dict, "request_counts": dict})
    if status is not None and not isinstance(status["shards"].get("total"), int):
        raise StorageError(f"{out.url_of(layout.STATUS)}: missing or malformed shards.total; it "
                           "was damaged or is not batchgen's")
    return status


def read_status(output: str, endpoint_url: str | None = None) -> dict[str, Any]:
    out = _output(output, endpoint_url)
    status = _status_doc(out)
    plan = _read_json(out, layout.PLAN, {"shards": list}) if status is None else None
    if status is None and plan is None:
        raise StorageError(f"{output}: no batchgen job here (no status.json or plan.json)")
    try:
        done = out.list_names(layout.DONE)
        failed = out.list_names(layout.FAILED)
        succeeded = out.exists(layout.SUCCESS)
    except OSError as e:
        raise StorageError(f"{output}: cannot list the job's commit markers: {e}") from None
    if status is None:  # planned, but the driver never wrote a status
        total = len(plan["shards"])
        status = {
            "state": "validating",
            "shards": {"total": total, "running": 0},
            "request_counts": {"total": None, "completed": None, "failed": None},
        }
    status["shards"]["completed"] = len(done)
    status["shards"]["failed"] = len(failed)
    if succeeded:
        status["state"] = "completed"
    return status


def head_rows(output: str, n: int, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The first ``n`` output rows (all of them when there are fewer), reading only the first
    committed files."""
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = min(n, sys.maxsize)  # pyarrow's slices take C longs

    out = _output(output, endpoint_url)
    try:
        names = [x for x in out.list_names(layout.DATA) if x.endswith(".parquet")]
    except OSError as e:
        raise StorageError(f"{output}/data: cannot list it: {e}") from None
    if not names:
        raise StorageError(f"{output}: no committed output yet (data/ is empty)")
    rows: list[dict[str, Any]] = []
    for name in names:
        where = out.url_of(layout.DATA, name)
        try:
            with out.open_read(f"{layout.DATA}/{name}") as f:
                # pq.read_table on a Python file object aborts the process at exit (pyarrow 26)
                pf = pq.ParquetFile(f)
                missing = [c for c in SHOWN_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise StorageError(f"{where}: not a batchgen output file (no column "
                                       f"{', '.join(missing)})")
                rows += pf.read().slice(0, n - len(rows)).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{where}: not a readable Parquet file ({e}); it was damaged or "
                               "is not batchgen's") from None
        if len(rows) >= n:
            break
    return rows


def _drop_redacted(value: Any) -> Any:
    """``value`` without the entries ``redact`` replaced, at any depth."""
    if isinstance(value, dict):
        return {k: _drop_redacted(v) for k, v in value.items() if v != REDACTED}
    if isinstance(value, list):
        return [_drop_redacted(v) for v in value]
    return value


def stored_spec(output: str, endpoint_url: str | None = None, overrides: list[str] | None = None):
    """The spec a job was started with, from its ``job.json``, for ``batchgen resume``.

    Credentials were redacted when it was written (by batchgen before specs refused them); they
    come from the environment again."""
    from batchgen.spec.load import apply_overrides, parse_spec

    out = _output(output, endpoint_url)
    job = _read_json(out, layout.JOB, {"spec": dict})
    if job is None:
        raise StorageError(f"{output}: no batchgen job here to resume (no job.json)")
    data = job["spec"]
    for section in ("storage", "output"):
        if not isinstance(data.setdefault(section, {}), dict):
            raise StorageError(f"{out.url_of(layout.JOB)}: spec.{section} is not a mapping; it "
                               "was damaged or is not batchgen's")
    storage = data["storage"]
    storage["options"] = _drop_redacted(storage.get("options") or {})
    if endpoint_url and not storage.get("endpoint_url"):
        storage["endpoint_url"] = endpoint_url
    data["output"]["path"] = output  # where it was found, even if it was moved
    return parse_spec(apply_overrides(data, overrides or []), source=out.url_of(layout.JOB))


def format_status(st: dict) -> str:
    """``read_status``'s document as the lines ``batchgen status`` prints. read_status checked
    the keys it needs; the rest of status.json may come from anywhere."""
    sh, rc = st["shards"], st["request_counts"]
    lines = [
        f"state:    {printable(st['state'])}",
        f"shards:   {sh['completed']}/{sh['total']} committed, {sh['failed']} failed",
        f"requests: {rc.get('completed')}/{rc.get('total')} completed, {rc.get('failed')} failed",
    ]
    tokens = st.get("tokens")
    if isinstance(tokens, dict):
        made = (f"{tokens['scored']} scored" if tokens.get("scored") and not tokens.get("generated")
                else f"{tokens.get('generated')} generated")
        lines.append(f"tokens:   {made}, {st.get('tokens_per_second', 0)} tok/s")
    if isinstance(st.get("eta_seconds"), (int, float)) and st["state"] == "in_progress":
        lines.append(f"eta:      {st['eta_seconds']:.0f}s")
    if st.get("error"):
        lines.append(f"error:    {printable(str(st['error']))}")
    return "\n".join(lines)


def printable(text: str) -> str:
    """``text`` as is, or escaped (repr) if it holds control characters: an escape sequence or
    a newline from the data must not reach the terminal."""
    return text if text.isprintable() else repr(text)
