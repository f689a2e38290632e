"""The driver: a job from start to end, on Ray (with ``scheduler``, the job wing's Ray users).

A run is prepare → execute → finalize. Prepare (no Ray): take the lock, plan or read the stored
plan, check the model, write job.json and plan.json, clear stale staging, list what is committed.
Execute: start replicas, feed shards, commit results (``commit.Committer``). Finalize: manifest
and ``_SUCCESS`` when every shard is committed. From the moment a status is written, every way
out ends in a final state (completed, failed or cancelled).

Execute joins or starts Ray and hands the shards to ``scheduler.Scheduler``, which owns the
replicas, their retries and the commits.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import ray

from batchgen.errors import BatchgenError, Cancelled, JobFailed, one_line
from batchgen.io import layout
from batchgen.io.storage import output_storage
from batchgen.job.interrupts import Interrupts
from batchgen.job.lock import JobLock
from batchgen.job.plan import resolve_local_paths
from batchgen.job.prepare import Job, Say, end_status, prepare, resume_command
from batchgen.job.progress import Display
from batchgen.job.scheduler import Scheduler
from batchgen.spec import JobSpec

CONNECT_TIMEOUT_S = 10.0


@dataclass
class JobSummary:
    output: str
    state: str
    shards: int
    rows: int
    outputs: int
    errors: int
    generated_tokens: int
    tokens_per_second: float  # generated (or scored) tokens per second of this run
    seconds: float
    scored_tokens: int = 0  # mode: score

    def line(self) -> str:
        """What ``batchgen run`` prints at the end."""
        tokens = (f"{self.scored_tokens} tokens scored" if self.scored_tokens
                  and not self.generated_tokens else f"{self.generated_tokens} tokens")
        return (f"{self.state}: {self.rows} rows, {self.outputs} outputs ({self.errors} errors), "
                f"{tokens} in {self.seconds:.1f}s ({self.tokens_per_second:.1f} tok/s) -> "
                f"{self.output}")


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
            _final_status(job, lock, "failed", one_line(e))
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
                scheduler = Scheduler(spec, job.committer, progress, display, say, interrupts)
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
        scored_tokens=progress.scored_tokens,
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
            raise BatchgenError(f"cannot join the Ray cluster at {target}{hint}: "
                                 f"{one_line(e, last=True)}") from None
        return True, False
    # A fresh local instance pinned to loopback, never some other cluster found on the host.
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    except Exception as e:  # noqa: BLE001 - Ray raises bare Exceptions for a start that timed out
        try:
            ray.shutdown()  # whatever of it did start
        except Exception:  # noqa: BLE001
            pass
        raise BatchgenError(
            f"could not start a local Ray: {one_line(e).rstrip('.')}. A busy machine can be too "
            "slow for Ray's start-up: run it again, or start Ray yourself (`ray start --head`) "
            "and pass --address") from None
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
