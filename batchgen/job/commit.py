"""The commit protocol and its records. No Ray: the driver calls it, and tests call it alone.

Commit, for a result whose attempt is still the shard's current one: check the lock is still
ours, publish the staged file at ``data/part-<shard>.parquet`` (rename locally, server-side copy
on S3; window summaries first, so data never points at missing chunks), write the done marker,
then delete staging. A result from an attempt the driver gave up on (a zombie) is discarded with
its staging. Publishing is idempotent (a fixed key per shard), so a commit repeated after a crash
overwrites rather than duplicates.

The done markers are the truth about what is committed. ``done-index.json.gz`` holds all of them
in one object, so a resume reads one object instead of one per shard; it is rewritten whenever a
marker was added since the last write, at most every ``INDEX_EVERY_S``, and at exit. A run that
replaces markers (``--retry-failed``) removes the index when it starts and writes it only at its
end: a kill in between must leave the markers themselves as the truth, not an index that still
holds markers replaced since.

Every write here first makes sure the lock is still ours: a driver that was taken over writes
nothing more into the output.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from batchgen.errors import StorageError
from batchgen.io import layout
from batchgen.io.inputs import Shard
from batchgen.io.storage import Storage
from batchgen.job.lock import JobLock
from batchgen.job.plan import Plan
from batchgen.job.progress import now_iso
from batchgen.spec import JobSpec

INDEX_EVERY_S = 60.0


@dataclass(frozen=True)
class Task:
    shard: Shard
    redo_errors: str | None = None  # committed file whose error rows are generated again


class Committer:
    """Commits results into ``out`` and keeps the done markers in memory (shard id -> marker)."""

    def __init__(self, out: Storage, lock: JobLock | None, markers: dict[str, dict[str, Any]],
                 failed_ids: set[str]):
        self.out = out
        self.lock = lock
        self.markers = markers
        self.failed_ids = failed_ids  # shards with a failed/ record from an earlier run
        self._unindexed = 0  # markers added or replaced since the index was last written
        self._last_index = time.monotonic()
        self._replacing = False  # markers are being replaced: the index waits for the end

    def commit(self, task: Task, result: dict[str, Any], *, current: str | None,
               attempts: int) -> dict[str, Any] | None:
        """Commit ``result`` if its attempt is ``current``; returns the done marker, or None
        for a zombie (discarded)."""
        shard_id = task.shard.shard_id
        if current != result["attempt"]:
            self.discard(result)
            return None
        if self.lock is not None:
            self.lock.check()  # a driver that was taken over must not publish anything
        final = layout.data_path(shard_id)
        chunks = layout.chunks_path(shard_id) if result.get("staged_chunks") else None
        if chunks:
            self.out.publish(result["staged_chunks"], chunks)
        self.out.publish(result["staged"], final)
        marker = {k: v for k, v in result.items() if k not in ("staged", "staged_chunks")}
        # Milliseconds: commits come several a second, and their spacing is the job's speed.
        marker.update(file=final, chunks_file=chunks, attempts=attempts,
                      committed_at=now_iso("milliseconds"))
        if self.lock is not None:
            marker["lock_epoch"] = self.lock.epoch
        if task.redo_errors:
            marker["errors_before_retry"] = self.markers[shard_id]["errors"]
        self.out.write_json(layout.done_path(shard_id), marker)
        self.out.remove(layout.staging_dir(shard_id), recursive=True)
        if shard_id in self.failed_ids:  # an earlier run gave up on it; it is done now
            self.out.remove(layout.failed_path(shard_id))
            self.failed_ids.discard(shard_id)
        self.markers[shard_id] = marker
        self._unindexed += 1
        return marker

    def discard(self, result: dict[str, Any]) -> None:
        for staged in (result.get("staged"), result.get("staged_chunks")):
            if staged:
                self.out.remove(staged)  # an attempt we gave up on: never reaches data/

    def record_failure(self, task: Task, attempts: int, reason: str) -> None:
        self._check_lock()
        self.out.write_json(
            layout.failed_path(task.shard.shard_id),
            {**asdict(task.shard), "attempts": attempts, "error": reason,
             "retrying_errors_of": task.redo_errors, "failed_at": now_iso()},
        )

    def clear_staging(self) -> None:
        """Staging left by a dead driver's attempts is garbage: only the lock holder commits."""
        self._check_lock()
        self.out.remove(layout.STAGING, recursive=True)

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def forget_completion(self, *, markers_change: bool) -> None:
        """A run with work to do: the job is not complete until it ends, whatever an earlier
        run left. When committed markers will be replaced (``--retry-failed``) the index goes
        too, so a kill before the next index write leaves the markers themselves as the truth."""
        self._check_lock()
        self.out.remove(layout.SUCCESS)
        self.out.remove(layout.MANIFEST)
        if markers_change:
            self._replacing = True
            self.out.remove(layout.INDEX)

    def maybe_write_index(self) -> None:
        if (self._unindexed and not self._replacing
                and time.monotonic() - self._last_index >= INDEX_EVERY_S):
            self.write_index()

    def write_index(self, *, final: bool = False) -> None:
        """Write the index (``final``: at the end of a run, also one that replaced markers)."""
        if self.lock is not None and self.lock.lost:
            return  # not ours any more
        if self._replacing and not final:
            return
        self._last_index = time.monotonic()
        try:
            blob = gzip.compress(json.dumps(list(self.markers.values())).encode(), compresslevel=1)
            self.out.write_bytes(layout.INDEX, blob)
            self._unindexed = 0
        except Exception:  # noqa: BLE001 - only an optimisation; the markers stay the truth
            pass

    def write_manifest(self, spec: JobSpec, plan: Plan) -> None:
        self._check_lock()
        markers = [self.markers[s.shard_id] for s in plan.shards]
        self.out.write_json(layout.MANIFEST, manifest(spec, plan, markers))
        self.out.write_bytes(layout.SUCCESS, b"")


def load_markers(out: Storage, done_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The done markers of ``done_ids`` (from one listing): from the index the last driver
    left where it agrees, and only the markers it did not know are read one by one. On S3 that
    is one GET instead of one per committed shard."""
    index: dict[str, dict[str, Any]] = {}
    try:
        index = {m["shard_id"]: m for m in json.loads(gzip.decompress(out.read_bytes(layout.INDEX)))}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        index = {}  # unreadable: the markers themselves are the truth
    known = {sid: index[sid] for sid in done_ids if sid in index}
    missing = sorted(done_ids - set(known))
    known.update({m["shard_id"]: m for m in read_markers(out, missing)})
    return known


MARKER_KEYS = ("shard_id", "file", "rows", "outputs", "errors", "prompt_tokens",
               "generated_tokens")


def read_markers(out: Storage, shard_ids: list[str]) -> list[dict[str, Any]]:
    if not shard_ids:
        return []
    paths = [out.path(layout.done_path(sid)) for sid in shard_ids]
    blobs = out.fs.cat(paths)  # concurrent on S3: one batch, not one round trip per shard
    markers = []
    for sid, p in zip(shard_ids, paths):
        try:
            marker = json.loads(blobs[p])
            missing = [k for k in MARKER_KEYS if k not in marker]
        except (ValueError, TypeError):
            marker, missing = None, ["(not a JSON object)"]
        if missing or not isinstance(marker, dict):
            raise StorageError(
                f"{out.url_of(layout.done_path(sid))}: not a batchgen done marker (missing "
                f"{', '.join(missing)}); remove it to run shard {sid} again")
        markers.append(marker)
    return markers


def manifest(spec: JobSpec, plan: Plan, markers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "fingerprint": plan.fingerprint,
        "input_rows": plan.total_rows,
        "samples_per_row": spec.generation.n,
        "output_rows": sum(m["outputs"] for m in markers),
        "error_rows": sum(m["errors"] for m in markers),
        "prompt_tokens": sum(m["prompt_tokens"] for m in markers),
        "generated_tokens": sum(m["generated_tokens"] for m in markers),
        "scored_tokens": sum(m.get("scored_tokens", 0) for m in markers),
        **{k: sum(m.get(k, 0) for m in markers)
           for k in ("parsed", "parse_errors", "duplicates_removed", "chunked_rows", "chunks")},
        "files": [
            {"path": m["file"], "shard_id": m["shard_id"], "rows": m["outputs"]} for m in markers
        ],
        "completed_at": now_iso(),
    }
