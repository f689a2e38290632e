"""Replicas on Ray, and the loop that feeds them shards: the Ray half of the driver.

Replicas are actors with ``max_restarts=-1, max_task_retries=0``: Ray restarts a dead process but
never re-runs a task, because a task has side effects (a staged upload); the scheduler owns
retries. An own ``ray.wait`` loop over {ref: (task, attempt, replica)} replaces dead replicas and
requeues their shards, which ``ray.util.ActorPool`` does not do. Each replica holds up to two
shards, run concurrently (a threaded actor), so it never idles while the driver commits and its
decoder does not drain at a shard boundary. Results travel back as small dicts; rows never pass
through the driver.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from batchgen.errors import BatchgenError, one_line
from batchgen.io import layout
from batchgen.io.inputs import Shard
from batchgen.job.commit import Committer, Task
from batchgen.job.interrupts import Interrupts
from batchgen.job.prepare import Say
from batchgen.job.progress import Display, JobProgress
from batchgen.spec import JobSpec

IN_FLIGHT_PER_REPLICA = 2
STATUS_EVERY_S = 2.0


# Threaded (``max_concurrency``): the replica's two shards run at once, in two threads of one
# ShardWorker, whose engine decodes both in one loop (``engine.feed``): one shard's rows fill the
# slots the other's free, and one's reading and writing overlap the other's decoding.
@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=IN_FLIGHT_PER_REPLICA)
class ReplicaActor:
    """One model replica; wraps a ShardWorker (thread-safe)."""

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


class Scheduler:
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
                self.progress.running = len(self.inflight)
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
            self._retry(task, queue, f"replica unavailable: {one_line(e, last=True)}")
        except RayActorError as e:
            if self.replicas[idx] is actor:  # its other queued shard fails the same way
                self._replace(idx, e)
            self._retry(task, queue, f"replica died: {one_line(e, last=True)}")
        except RayTaskError as e:
            self._retry(task, queue, one_line(e.cause if e.cause is not None else e, last=True))
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
            raise BatchgenError(f"model replicas cannot start: {one_line(error, last=True)}") from None
        ray.kill(self.replicas[idx], no_restart=True)
        self._start(idx)

    def _write_status(self) -> None:
        now = time.monotonic()
        if now - self.last_status >= STATUS_EVERY_S:
            self.last_status = now
            self.committer.out.write_json(layout.STATUS, self.progress.status())
        self.committer.maybe_write_index()
