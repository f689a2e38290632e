"""The Ray driver: the only module that imports Ray.

validate → plan (or read the stored plan) → start replicas → feed shards → commit → finalize.

Replicas are actors with ``max_restarts=-1, max_task_retries=0``: Ray restarts a dead process but
never re-runs a task, because a task has side effects (a staged upload); the driver owns retries.
Each replica holds up to two shards (one running, one queued), so it never idles while the driver
commits. Results travel back as small dicts; rows never pass through the driver.

Commit, for a result whose attempt is still current: publish the staged file at
``data/part-<shard>.parquet`` (rename locally, server-side copy on S3), write the done marker, then
delete staging. A result from an attempt the driver gave up on is discarded with its staging.

One driver per output: ``lock.JobLock`` is held from before the plan is read until the end.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from batchgen.engine import check_model
from batchgen.errors import BatchgenError, Cancelled, JobFailed, StorageError
from batchgen.lock import JobLock
from batchgen.modelcache import local_model
from batchgen.plan import Plan, Shard, check_unique_ids, current_fingerprint, make_plan
from batchgen.progress import Display, JobProgress, now_iso
from batchgen.spec import JobSpec
from batchgen.storage import Storage, redact
from batchgen.worker import ShardWorker, output_storage

IN_FLIGHT_PER_REPLICA = 2
STATUS_EVERY_S = 2.0


@ray.remote(max_restarts=-1, max_task_retries=0)
class ReplicaActor:
    """One model replica; wraps a ShardWorker."""

    def __init__(self, spec: dict[str, Any]):
        self.worker = ShardWorker(JobSpec.model_validate(spec))
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.name = context.get_actor_name()

    def ready(self) -> bool:
        return True

    def run(self, shard: dict[str, Any], attempt: str, redo_errors: str | None = None) -> dict[str, Any]:
        result = self.worker.run(Shard(**shard), attempt, redo_errors).to_dict()
        result["node_id"] = self.node
        result["replica"] = self.name
        result["pid"] = os.getpid()
        return result


@dataclass
class JobSummary:
    output: str
    state: str
    shards: int
    rows: int
    outputs: int
    errors: int
    generated_tokens: int
    tokens_per_second: float
    seconds: float


def data_path(shard_id: str) -> str:
    return f"data/part-{shard_id}.parquet"


def chunks_path(shard_id: str) -> str:
    return f"chunks/part-{shard_id}.parquet"


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    live: bool | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    retry_failed: bool = False,
) -> JobSummary:
    """Run ``spec`` to completion, or resume it if its output already holds its plan.

    ``force`` resumes even though the job's fingerprint changed; ``retry_failed`` also re-runs
    the ``finish_reason: error`` rows of committed shards."""
    out = output_storage(spec)
    out.ensure_writable()
    lock = JobLock(out)
    lock.acquire()  # before the plan is read: everything below is one driver's
    try:
        return _run_locked(spec, out, lock, address=address, live=live, log=log, force=force,
                           retry_failed=retry_failed)
    finally:
        lock.release()


def _run_locked(spec, out, lock, *, address, live, log, force, retry_failed) -> JobSummary:
    started = time.monotonic()
    say = log or (lambda s: print(s, flush=True))

    # 1. Validate everything cheap before any replica starts.
    plan, is_new = _plan_or_resume(spec, out, force, say)
    check_model(local_model(spec, weights=False)[0], spec.generation, spec.input)
    if is_new:  # written before any generation, and only once everything checked out
        check_unique_ids(spec, plan)
        out.write_json("job.json", _job_doc(spec, plan))
        out.write_json("plan.json", plan.to_json())
    # Staging left by a dead driver's attempts is garbage now: only we commit, and we hold the lock.
    out.remove("_batchgen/staging", recursive=True)
    done_ids = {name.removesuffix(".json") for name in out.list_names("_batchgen/done")}
    failed_ids = {name.removesuffix(".json") for name in out.list_names("_batchgen/failed")}
    markers = _load_markers(out, done_ids)
    tasks = [_Task(s) for s in plan.shards if s.shard_id not in done_ids]
    if retry_failed:
        tasks += [_Task(s, redo_errors=markers[s.shard_id]["file"]) for s in plan.shards
                  if s.shard_id in markers and markers[s.shard_id]["errors"] > 0]

    progress = JobProgress(
        name=spec.name,
        output=spec.output.path,
        total_shards=len(plan.shards),
        total_rows=plan.total_rows,
        n=spec.generation.n,
    )
    progress.resume_from(list(markers.values()))
    out.write_json("status.json", progress.status())
    if done_ids:
        say(f"resuming: {len(done_ids)} of {len(plan.shards)} shards already committed")
    if retry_failed:
        redo = sum(1 for t in tasks if t.redo_errors)
        say(f"retrying the error rows of {redo} committed shard(s)")

    # 2. Run the pending shards on Ray.
    started_ray, local = _connect(address)
    restore_sigterm = _sigterm_as_interrupt()
    try:
        replicas = _placeable_replicas(spec, say, fixed_size=local)
        progress.start()
        out.write_json("status.json", progress.status())
        if tasks:
            with Display(progress, live=live, log=log) as display:
                scheduler = _Scheduler(spec, out, progress, display, say, markers, failed_ids, lock)
                scheduler.run(tasks, replicas)
    except KeyboardInterrupt:
        progress.finish("cancelled", "stopped by the user")
        out.write_json("status.json", progress.status())
        raise Cancelled(
            f"cancelled after {progress.done_shards}/{progress.total_shards} shards; they stay "
            f"committed. Resume with: {resume_command(spec)}"
        ) from None
    finally:
        restore_sigterm()
        _write_index(out, markers)  # so the next resume reads one object, not every marker
        if started_ray:
            ray.shutdown()

    # 3. Finalize: manifest and _SUCCESS only when every shard is committed.
    if progress.failed_shards:
        progress.failed_shards.sort()
        msg = (
            f"{len(progress.failed_shards)} shard(s) failed after "
            f"{spec.resources.max_attempts} attempts: {', '.join(progress.failed_shards[:10])}"
            f"{' ...' if len(progress.failed_shards) > 10 else ''}; reasons in "
            f"{out.url_of('_batchgen/failed')}/. The other shards are committed. Once the cause is "
            f"fixed, run only the failed ones with: {resume_command(spec)}"
        )
        progress.finish("failed", msg)
        out.write_json("status.json", progress.status())
        raise JobFailed(msg)
    progress.state = "finalizing"
    out.write_json("status.json", progress.status())
    # Every marker is in hand: read at the start or written by this run; no second read.
    out.write_json("manifest.json", _manifest(spec, plan, [markers[s.shard_id] for s in plan.shards]))
    out.write_bytes("_SUCCESS", b"")
    progress.finish("completed")
    out.write_json("status.json", progress.status())
    return JobSummary(
        output=spec.output.path,
        state="completed",
        shards=len(plan.shards),
        rows=progress.rows_done,
        outputs=progress.outputs_done,
        errors=progress.error_rows,
        generated_tokens=progress.generated_tokens,
        tokens_per_second=progress.tokens_per_second,
        seconds=time.monotonic() - started,
    )


def resume_command(spec: JobSpec) -> str:
    endpoint = f" --endpoint-url {spec.storage.endpoint_url}" if spec.storage.endpoint_url else ""
    return f"batchgen resume {spec.output.path}{endpoint}"


@dataclass(frozen=True)
class _Task:
    shard: Shard
    redo_errors: str | None = None  # committed file whose error rows are generated again


def _plan_or_resume(spec: JobSpec, out: Storage, force: bool, say) -> tuple[Plan, bool]:
    """The stored plan if this output already holds this job, else a new one (not yet written).

    A stored plan is never re-cut: shard ids and row ranges stay as they were."""
    stored = out.read_json_or_none("plan.json")
    if stored is None:
        return make_plan(spec), True
    old = Plan.from_json(stored)
    fingerprint, parts = current_fingerprint(spec)
    if old.fingerprint == fingerprint:
        return old, False
    changed = [k for k, v in parts.items() if old.fingerprint_parts.get(k) != v]
    if not force:
        raise StorageError(
            f"output.path {spec.output.path} holds a different job (changed: "
            f"{', '.join(changed)}); use a new output.path, remove the old output, or resume "
            "anyway with --force (committed shards keep their outputs)"
        )
    say(f"--force: resuming although {', '.join(changed)} changed; committed shards keep their "
        "outputs, the rest run with the new settings")
    forced = Plan(fingerprint, parts, old.files, old.shards)
    out.write_json("job.json", {**_job_doc(spec, forced), "forced_from": old.fingerprint})
    out.write_json("plan.json", forced.to_json())
    return forced, False


def _job_doc(spec: JobSpec, plan: Plan) -> dict[str, Any]:
    versions = {}
    for pkg in ("batchgen", "ray", "torch", "transformers", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    doc = spec.model_dump(mode="json")
    doc["storage"]["options"] = redact(doc["storage"]["options"])
    return {
        "spec": doc,
        "fingerprint": plan.fingerprint,
        "fingerprint_parts": plan.fingerprint_parts,
        "versions": versions,
        "created_at": now_iso(),
    }


INDEX = "_batchgen/done-index.json.gz"
INDEX_EVERY_S = 60.0


def _load_markers(out: Storage, done_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The done markers of ``done_ids`` (from one listing): from the index the last driver left,
    and only the markers it did not know are read one by one. On S3 that is one GET instead of
    one per committed shard."""
    index: dict[str, dict[str, Any]] = {}
    try:
        index = {m["shard_id"]: m for m in json.loads(gzip.decompress(out.read_bytes(INDEX)))}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        index = {}  # unreadable: the markers themselves are the truth
    known = {sid: index[sid] for sid in done_ids if sid in index}
    missing = sorted(done_ids - set(known))
    known.update({m["shard_id"]: m for m in _read_markers(out, missing)})
    return known


def _write_index(out: Storage, markers: dict[str, dict[str, Any]]) -> None:
    try:
        blob = gzip.compress(json.dumps(list(markers.values())).encode(), compresslevel=1)
        out.write_bytes(INDEX, blob)
    except Exception:  # noqa: BLE001 - only an optimisation; the markers stay the truth
        pass


def _read_markers(out: Storage, shard_ids: list[str]) -> list[dict[str, Any]]:
    if not shard_ids:
        return []
    paths = [out.path(f"_batchgen/done/{sid}.json") for sid in shard_ids]
    blobs = out.fs.cat(paths)  # concurrent on S3: one batch, not one round trip per shard
    return [json.loads(blobs[p]) for p in paths]


def _manifest(spec: JobSpec, plan: Plan, markers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "fingerprint": plan.fingerprint,
        "input_rows": plan.total_rows,
        "samples_per_row": spec.generation.n,
        "output_rows": sum(m["outputs"] for m in markers),
        "error_rows": sum(m["errors"] for m in markers),
        "prompt_tokens": sum(m["prompt_tokens"] for m in markers),
        "generated_tokens": sum(m["generated_tokens"] for m in markers),
        **{k: sum(m.get(k, 0) for m in markers)
           for k in ("parsed", "parse_errors", "duplicates_removed", "chunked_rows", "chunks")},
        "files": [
            {"path": m["file"], "shard_id": m["shard_id"], "rows": m["outputs"]} for m in markers
        ],
        "completed_at": now_iso(),
    }


def _connect(address: str | None) -> tuple[bool, bool]:
    """Join ``address`` (or RAY_ADDRESS), or start a private local Ray.

    Returns (we started or joined it here, it is a local Ray we started)."""
    if ray.is_initialized():
        return False, False
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        extra = {}
        if _is_loopback(target):
            # Ray otherwise swaps loopback for the host's detected address and cannot connect.
            extra["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(address=target, log_to_driver=True, **extra)
        except (ConnectionError, RuntimeError) as e:
            hint = ""
            if "auth" in f"{e} {e.__cause__}".lower():
                hint = (" (the cluster uses token authentication: set RAY_AUTH_MODE=token to use "
                        "~/.ray/auth_token, or RAY_AUTH_TOKEN)")
            raise BatchgenError(f"cannot join the Ray cluster at {target}{hint}: {_short(e)}") from None
        return True, False
    # A fresh local instance pinned to loopback, never some other cluster found on the host.
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    return True, True


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host == "localhost" or host.startswith("127.")


class _Interrupts:
    """SIGTERM and Ctrl-C become KeyboardInterrupt, except inside a commit: there the signal is
    held until the commit (publish, marker, cleanup) is whole, so a stop never leaves a data
    file without its done marker."""

    def __init__(self):
        self.deferring = False
        self.pending = False

    def handler(self, signum, frame):
        if self.deferring:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def critical(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


_INTERRUPTS = _Interrupts()


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SIGTERM (Ray job stop, schedulers, kill) stops the job like Ctrl-C: status `cancelled`,
    committed shards kept. Returns a function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _INTERRUPTS.handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _placeable_replicas(spec: JobSpec, say: Callable[[str], None], fixed_size: bool) -> int:
    """Replicas to start. A replica that fits nowhere would wait forever, so that is an error;
    on a local Ray we started (it cannot grow) the count is capped to what fits."""
    r = spec.resources
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if r.cpus_per_replica > cpus or r.gpus_per_replica > gpus:
        raise BatchgenError(
            f"a replica needs {r.cpus_per_replica} CPU and {r.gpus_per_replica} GPU "
            f"(resources.cpus_per_replica, resources.gpus_per_replica) but the Ray cluster has "
            f"{cpus:g} CPU and {gpus:g} GPU in all"
        )
    if not fixed_size:
        return r.replicas  # an autoscaling cluster may still add nodes
    fits = int(min(cpus / r.cpus_per_replica, gpus / r.gpus_per_replica if r.gpus_per_replica else 1e9))
    if fits < r.replicas:
        say(f"the local Ray has room for {fits} of {r.replicas} replicas "
            f"({cpus:g} CPU, {gpus:g} GPU); running {fits}")
    return min(r.replicas, fits)


class _Scheduler:
    """An own ray.wait loop over {ref: (task, attempt, replica)}: dead replicas are replaced and
    their shards requeued, which ray.util.ActorPool does not do."""

    def __init__(self, spec, out, progress, display, say, markers, failed_ids, lock):
        self.spec: JobSpec = spec
        self.out: Storage = out
        self.progress: JobProgress = progress
        self.display: Display = display
        self.say = say
        self.markers: dict[str, dict[str, Any]] = markers  # shard id -> done marker, filled on commit
        self.failed_ids: set[str] = failed_ids  # shards with a failed/ record from an earlier run
        self.lock: JobLock = lock
        self.payload = spec.model_dump(mode="json")
        self.replicas: list[Any] = []
        self.starting: dict[Any, int] = {}  # ready() ref -> replica index, until it has loaded
        self.inflight: dict[Any, tuple[_Task, str, int, Any]] = {}
        self.current: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.replacements = 0
        self.last_status = 0.0
        self.last_index, self.indexed = time.monotonic(), len(markers)
        # Named, so an operator (or a test) can find them: ray list actors / ray.get_actor.
        self.tag = f"batchgen-{uuid.uuid4().hex[:8]}"
        self.generation = 0

    def _new_replica(self):
        r = self.spec.resources
        self.generation += 1
        actor = ReplicaActor.options(
            name=f"{self.tag}-replica-{self.generation}",
            num_cpus=r.cpus_per_replica,
            num_gpus=r.gpus_per_replica,
            # One node lost takes as few replicas with it as possible.
            scheduling_strategy="SPREAD",
        ).remote(self.payload)
        return actor, actor.ready.remote()

    def _start(self, idx: int) -> None:
        actor, ready = self._new_replica()
        if idx == len(self.replicas):
            self.replicas.append(actor)
        else:
            self.replicas[idx] = actor
        self.starting = {ref: i for ref, i in self.starting.items() if i != idx}
        self.starting[ready] = idx

    def run(self, tasks: list[_Task], replicas: int) -> None:
        queue = deque(tasks)
        for idx in range(min(replicas, len(tasks))):
            self._start(idx)
        try:
            while queue or self.inflight:
                if self.lock.lost:
                    raise BatchgenError(f"stopping: {self.lock.lost}")
                self._feed(queue)
                ready, _ = ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._collect(ref, queue)
                self.display.update()
                self._write_status()
        finally:
            # In-flight attempts are abandoned: their staging is never committed, and the next
            # run clears it. Killing (not draining) keeps a stop within Ray's SIGKILL grace.
            for actor in self.replicas:
                ray.kill(actor, no_restart=True)
        self.display.update(force=True)

    def _started(self, ref) -> None:
        idx = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as e:
            self._replace(idx, e)

    def _feed(self, queue: deque) -> None:
        """Give each loaded replica up to IN_FLIGHT_PER_REPLICA shards. A replica still starting
        gets none: a replacement that never fits (its node is gone) must not strand shards."""
        load = [0] * len(self.replicas)  # shards queued on each current replica
        for _, _, idx, actor in self.inflight.values():
            if self.replicas[idx] is actor:
                load[idx] += 1
        loading = set(self.starting.values())
        for idx in sorted(set(range(len(self.replicas))) - loading, key=lambda i: load[i]):
            while queue and load[idx] < IN_FLIGHT_PER_REPLICA:
                task = queue.popleft()
                sid = task.shard.shard_id
                attempt = uuid.uuid4().hex[:12]
                self.current[sid] = attempt
                self.attempts[sid] = self.attempts.get(sid, 0) + 1
                ref = self.replicas[idx].run.remote(asdict(task.shard), attempt, task.redo_errors)
                self.inflight[ref] = (task, attempt, idx, self.replicas[idx])
                load[idx] += 1
        self.progress.running = len(self.inflight)

    def _collect(self, ref, queue: deque) -> None:
        task, attempt, idx, actor = self.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except (ActorUnavailableError, GetTimeoutError) as e:
            # Restarting, or its node is unreachable. A restart reloads the model anyway, and it
            # may wait forever for a node that is gone, so start a fresh replica instead; if
            # the old one is alive after all, its late results are zombies and are discarded.
            time.sleep(0.5)
            if self.replicas[idx] is actor:
                self._replace(idx, e)
            self._retry(task, queue, f"replica unavailable: {_short(e)}")
        except RayActorError as e:
            if self.replicas[idx] is actor:  # its other queued shard fails the same way
                self._replace(idx, e)
            self._retry(task, queue, f"replica died: {_short(e)}")
        except RayTaskError as e:
            self._retry(task, queue, _short(e.cause if e.cause is not None else e))
        else:
            self.commit(task, result)

    def commit(self, task: _Task, result: dict[str, Any]) -> bool:
        """Commit ``result`` if its attempt is the shard's current one; False for a zombie."""
        with _INTERRUPTS.critical():
            return self._commit(task, result)

    def _commit(self, task: _Task, result: dict[str, Any]) -> bool:
        shard = task.shard
        if self.current.get(shard.shard_id) != result["attempt"]:
            for staged in (result["staged"], result.get("staged_chunks")):
                if staged:
                    self.out.remove(staged)  # an attempt we gave up on: never reaches data/
            return False
        final = data_path(shard.shard_id)
        if result.get("staged_chunks"):  # first, so data/ never refers to missing chunks
            self.out.publish(result["staged_chunks"], chunks_path(shard.shard_id))
        self.out.publish(result["staged"], final)
        marker = {
            **result,
            "file": final,
            "chunks_file": chunks_path(shard.shard_id) if result.get("staged_chunks") else None,
            "attempts": self.attempts[shard.shard_id],
            "committed_at": now_iso(),
        }
        marker.pop("staged")
        marker.pop("staged_chunks", None)
        if task.redo_errors:
            marker["errors_before_retry"] = self.markers[shard.shard_id]["errors"]
        self.out.write_json(f"_batchgen/done/{shard.shard_id}.json", marker)
        self.out.remove(f"_batchgen/staging/{shard.shard_id}", recursive=True)
        if shard.shard_id in self.failed_ids:  # an earlier run gave up on it; it is done now
            self.out.remove(f"_batchgen/failed/{shard.shard_id}.json")
            self.failed_ids.discard(shard.shard_id)
        self.current.pop(shard.shard_id, None)
        self.progress.committed(marker, replaces=self.markers.get(shard.shard_id) if task.redo_errors else None)
        self.markers[shard.shard_id] = marker
        return True

    def _retry(self, task: _Task, queue: deque, reason: str) -> None:
        sid = task.shard.shard_id
        self.current.pop(sid, None)
        if self.attempts[sid] < self.spec.resources.max_attempts:
            self.say(f"shard {sid}: attempt {self.attempts[sid]} failed ({reason}); retrying")
            queue.append(task)
            return
        self.say(f"shard {sid}: failed after {self.attempts[sid]} attempts: {reason}")
        self.progress.failed_shards.append(sid)
        self.out.write_json(
            f"_batchgen/failed/{sid}.json",
            {**asdict(task.shard), "attempts": self.attempts[sid], "error": reason,
             "retrying_errors_of": task.redo_errors, "failed_at": now_iso()},
        )

    def _replace(self, idx: int, error: Exception) -> None:
        self.replacements += 1
        limit = len(self.replicas) * self.spec.resources.max_attempts
        if getattr(error, "actor_init_failed", False) or self.replacements > limit:
            raise BatchgenError(f"model replicas cannot start: {_short(error)}") from None
        ray.kill(self.replicas[idx], no_restart=True)
        self._start(idx)

    def _write_status(self) -> None:
        now = time.monotonic()
        if now - self.last_status >= STATUS_EVERY_S:
            self.last_status = now
            self.out.write_json("status.json", self.progress.status())
        if now - self.last_index >= INDEX_EVERY_S and len(self.markers) != self.indexed:
            self.last_index, self.indexed = now, len(self.markers)
            _write_index(self.out, self.markers)


def _short(error: BaseException, limit: int = 500) -> str:
    text = str(error).strip().splitlines()
    msg = text[-1] if text else type(error).__name__
    return msg[:limit]
