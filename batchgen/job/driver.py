"""The Ray driver: the only module that imports Ray.

A run is prepare → execute → finalize. Prepare (no Ray): take the lock, plan or read the stored
plan, check the model, write job.json and plan.json, clear stale staging, list what is committed.
Execute: start replicas, feed shards, commit results (``commit.Committer``). Finalize: manifest
and ``_SUCCESS`` when every shard is committed. From the moment a status is written, every way
out ends in a final state (completed, failed or cancelled).

Replicas are actors with ``max_restarts=-1, max_task_retries=0``: Ray restarts a dead process but
never re-runs a task, because a task has side effects (a staged upload); the driver owns retries.
Each replica holds up to two shards (one running, one queued), so it never idles while the driver
commits. Results travel back as small dicts; rows never pass through the driver.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from batchgen.errors import BatchgenError, Cancelled, JobFailed
from batchgen.io import layout
from batchgen.io.inputs import Shard
from batchgen.io.storage import output_storage
from batchgen.job.commit import Committer, Task
from batchgen.job.interrupts import Interrupts
from batchgen.job.lock import JobLock
from batchgen.job.plan import resolve_local_paths
from batchgen.job.prepare import Job, Say, end_status, prepare, resume_command
from batchgen.job.progress import Display, JobProgress
from batchgen.spec import JobSpec

IN_FLIGHT_PER_REPLICA = 2
STATUS_EVERY_S = 2.0
CONNECT_TIMEOUT_S = 10.0


@ray.remote(max_restarts=-1, max_task_retries=0)
class ReplicaActor:
    """One model replica; wraps a ShardWorker."""

    def __init__(self, spec: dict[str, Any]):
        from batchgen.shard.worker import ShardWorker

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


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    live: bool | None = None,
    log: Say | None = None,
    force: bool = False,
    retry_failed: bool = False,
) -> JobSummary:
    """Run ``spec`` to completion, or resume it if its output already holds its plan.

    ``force`` resumes even though the job's fingerprint changed; ``retry_failed`` also re-runs
    the ``finish_reason: error`` rows of committed shards."""
    started = time.monotonic()
    say = log or (lambda s: print(s, flush=True))
    as_given, spec = spec, resolve_local_paths(spec)
    out = output_storage(spec)
    out.ensure_writable()
    lock = JobLock(out)
    lock.acquire()  # before the plan is read: everything below is one driver's
    interrupts = Interrupts()
    restore_signals = interrupts.install()  # a stop while planning releases the lock too
    job: Job | None = None
    try:
        job = prepare(spec, as_given, out, lock, force=force, retry_failed=retry_failed, say=say)
        _execute(job, address=address, live=live, log=log, say=say, interrupts=interrupts)
        return _finalize(job, started)
    except KeyboardInterrupt:
        if job is None:  # prepare recorded the state itself, if it had written job.json
            raise Cancelled("cancelled while preparing the run; no shard ran. Run the same "
                            "command again to start (or resume) it") from None
        _final_status(job, lock, "cancelled", "stopped by the user")
        raise Cancelled(
            f"cancelled after {job.progress.done_shards}/{job.progress.total_shards} shards; "
            f"they stay committed. Resume with: {resume_command(spec)}"
        ) from None
    except BaseException as e:
        if job is not None:
            _final_status(job, lock, "failed", _short(e, from_end=False) or type(e).__name__)
        raise
    finally:
        restore_signals()
        lock.release()


def _final_status(job: Job, lock: JobLock, state: str, message: str) -> None:
    """Record how the run ended, unless it already did (a failed job) or the output is no
    longer ours (another driver took it over: its status is not ours to write)."""
    if not lock.lost and job.progress.finished_at is None:
        end_status(job.out, job.progress, state, message)


def _execute(job: Job, *, address: str | None, live: bool | None, log: Say | None, say: Say,
             interrupts: Interrupts) -> None:
    """Run the pending shards on Ray."""
    spec, out, progress = job.spec, job.out, job.progress
    out.write_json(layout.STATUS, progress.status())
    started_ray = False
    try:
        started_ray, local = _connect(address)
        interrupts.reclaim()
        replicas = _placeable_replicas(spec, say, fixed_size=local)
        progress.start()
        out.write_json(layout.STATUS, progress.status())
        if job.tasks:
            with Display(progress, live=live, log=log) as display:
                scheduler = _Scheduler(spec, job.committer, progress, display, say, interrupts)
                scheduler.run(job.tasks, replicas)
    finally:
        with interrupts.critical():  # a stop now is taken once this is done
            job.committer.write_index(final=True)  # the next resume reads one object
            if started_ray:
                ray.shutdown()


def _finalize(job: Job, started: float) -> JobSummary:
    spec, out, progress = job.spec, job.out, job.progress
    if progress.failed_shards:
        progress.failed_shards.sort()
        retrying = any(t.redo_errors and t.shard.shard_id in progress.failed_shards
                       for t in job.tasks)
        msg = (
            f"{len(progress.failed_shards)} shard(s) failed after "
            f"{spec.resources.max_attempts} attempts: {', '.join(progress.failed_shards[:10])}"
            f"{' ...' if len(progress.failed_shards) > 10 else ''}; reasons in "
            f"{out.url_of(layout.FAILED)}/. The other shards are committed. Once the cause is "
            f"fixed, run only the failed ones with: {resume_command(spec, retry_failed=retrying)}"
        )
        progress.finish("failed", msg)
        out.write_json(layout.STATUS, progress.status())
        raise JobFailed(msg)
    progress.state = "finalizing"
    out.write_json(layout.STATUS, progress.status())
    # Every marker is in hand: read at the start or written by this run; no second read.
    job.committer.write_manifest(spec, job.plan)
    progress.finish("completed")
    out.write_json(layout.STATUS, progress.status())
    return JobSummary(
        output=spec.output.path,
        state="completed",
        shards=len(job.plan.shards),
        rows=progress.rows_done,
        outputs=progress.outputs_done,
        errors=progress.error_rows,
        generated_tokens=progress.generated_tokens,
        tokens_per_second=progress.tokens_per_second,
        seconds=time.monotonic() - started,
    )


def _connect(address: str | None) -> tuple[bool, bool]:
    """Join ``address`` (or RAY_ADDRESS), or start a private local Ray.

    Returns (we started or joined it here, it is a local Ray we started)."""
    if ray.is_initialized():
        return False, False
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        _check_reachable(target)
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


def _check_reachable(target: str) -> None:
    """Ray retries a GCS address that nothing answers for minutes; fail in seconds instead."""
    hostport = target.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or an address form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise BatchgenError(
            f"cannot join the Ray cluster at {target}: nothing answers at {host}:{port} "
            f"({e.strerror or e}); start the cluster (`ray start --head`) or fix --address / "
            "RAY_ADDRESS"
        ) from None


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host == "localhost" or host.startswith("127.")


def _placeable_replicas(spec: JobSpec, say: Say, fixed_size: bool) -> int:
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

    def __init__(self, spec: JobSpec, committer: Committer, progress: JobProgress,
                 display: Display, say: Say, interrupts: Interrupts):
        self.spec = spec
        self.committer = committer
        self.progress = progress
        self.display = display
        self.say = say
        self.interrupts = interrupts
        self.payload = spec.model_dump(mode="json")
        self.replicas: list[Any] = []
        self.starting: dict[Any, int] = {}  # ready() ref -> replica index, until it has loaded
        self.inflight: dict[Any, tuple[Task, str, int, Any]] = {}
        self.current: dict[str, str] = {}  # shard id -> its current attempt
        self.attempts: dict[str, int] = {}
        self.replacements = 0
        self.last_status = 0.0
        # Named, so an operator (or a test) can find them: ray list actors / ray.get_actor.
        self.tag = f"batchgen-{uuid.uuid4().hex[:8]}"
        self.replicas_started = 0

    def _new_replica(self) -> tuple[Any, Any]:
        r = self.spec.resources
        self.replicas_started += 1
        actor = ReplicaActor.options(
            name=f"{self.tag}-replica-{self.replicas_started}",
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

    def run(self, tasks: list[Task], replicas: int) -> None:
        queue = deque(tasks)
        for idx in range(min(replicas, len(tasks))):
            self._start(idx)
        try:
            while queue or self.inflight:
                lock = self.committer.lock
                if lock is not None and lock.lost:
                    raise BatchgenError(f"stopping: {lock.lost}")
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

    def commit(self, task: Task, result: dict[str, Any]) -> bool:
        """Commit ``result`` if its attempt is the shard's current one; False for a zombie. A
        stop signal waits until the commit is whole."""
        sid = task.shard.shard_id
        with self.interrupts.critical():
            replaced = self.committer.markers.get(sid) if task.redo_errors else None
            marker = self.committer.commit(task, result, current=self.current.get(sid),
                                           attempts=self.attempts.get(sid, 1))
            if marker is None:
                return False
            self.current.pop(sid, None)
            self.progress.committed(marker, replaces=replaced)
            return True

    def _retry(self, task: Task, queue: deque, reason: str) -> None:
        sid = task.shard.shard_id
        self.current.pop(sid, None)
        if self.attempts[sid] < self.spec.resources.max_attempts:
            self.say(f"shard {sid}: attempt {self.attempts[sid]} failed ({reason}); retrying")
            queue.append(task)
            return
        self.say(f"shard {sid}: failed after {self.attempts[sid]} attempts: {reason}")
        self.progress.failed_shards.append(sid)
        self.committer.record_failure(task, self.attempts[sid], reason)

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
            self.committer.out.write_json(layout.STATUS, self.progress.status())
        self.committer.maybe_write_index()


def _short(error: BaseException, limit: int = 500, *, from_end: bool = True) -> str:
    """One line of an error: the last (a remote traceback ends with the cause) or the first."""
    text = str(error).strip().splitlines()
    msg = (text[-1] if from_end else text[0]) if text else type(error).__name__
    return msg[:limit]
