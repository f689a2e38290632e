"""Preparing a run, before any Ray: the plan (new, or the stored one if the job still matches
it), the pre-flight model check, job.json and plan.json, what is already committed, and the
shards left to run. No Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from batchgen.errors import BatchgenError, StorageError
from batchgen.io import layout
from batchgen.io.modelcache import local_model
from batchgen.io.modelcheck import check_model, light_tokenizer
from batchgen.io.storage import Storage
from batchgen.job.commit import Committer, Task, load_markers
from batchgen.job.fingerprint import FINGERPRINT_VERSION, changes, current_fingerprint
from batchgen.job.lock import JobLock
from batchgen.job.plan import Plan, check_unique_ids, make_plan
from batchgen.job.progress import JobProgress, now_iso
from batchgen.shard import longdocs
from batchgen.spec import JobSpec
from batchgen.spec.secrets import redact

Say = Callable[[str], None]


@dataclass
class Job:
    """Everything prepare found out, for execute and finalize."""

    spec: JobSpec
    out: Storage
    plan: Plan
    progress: JobProgress
    committer: Committer
    tasks: list[Task]
    retry_failed: bool


def prepare(spec: JobSpec, as_given: JobSpec, out: Storage, lock: JobLock, *, force: bool,
            retry_failed: bool, say: Say) -> Job:
    """The job as it stands: checked, recorded, and what is left to run. Everything cheap is
    checked before any replica starts, and before anything is written."""
    plan, is_new, job_doc = _plan_or_resume(spec, as_given, out, force, say)
    preflight(spec, plan, new_plan=is_new)
    if job_doc is not None:  # written before any generation, once everything checked out
        out.write_json(layout.JOB, job_doc)
        out.write_json(layout.PLAN, plan.to_json())
    progress = JobProgress(name=spec.name, output=spec.output.path,
                           total_shards=len(plan.shards), total_rows=plan.total_rows,
                           n=spec.generation.n)
    try:  # job.json is there: from here on, a failure or a stop leaves a final status too
        done_ids = {layout.shard_id_of(n) for n in out.list_names(layout.DONE)}
        failed_ids = {layout.shard_id_of(n) for n in out.list_names(layout.FAILED)}
        markers = load_markers(out, done_ids)
        committer = Committer(out, lock, markers, failed_ids)
        committer.clear_staging()
        tasks = [Task(s) for s in plan.shards if s.shard_id not in done_ids]
        if retry_failed:
            tasks += [Task(s, redo_errors=markers[s.shard_id]["file"]) for s in plan.shards
                      if s.shard_id in markers and markers[s.shard_id]["errors"] > 0]
        if tasks:
            committer.forget_completion(markers_change=retry_failed)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            end_status(out, progress, "cancelled", "stopped by the user while preparing the run")
        else:
            end_status(out, progress, "failed",
                       f"preparing the run: {str(e).strip() or type(e).__name__}")
        raise
    progress.resume_from(list(markers.values()))
    if done_ids:
        say(f"resuming: {len(done_ids)} of {len(plan.shards)} shards already committed")
    if retry_failed:
        say(f"retrying the error rows of {sum(1 for t in tasks if t.redo_errors)} committed shard(s)")
    return Job(spec, out, plan, progress, committer, tasks, retry_failed)


def preflight(spec: JobSpec, plan: Plan, *, new_plan: bool) -> dict[str, Any]:
    """What a run checks before any replica starts, beyond the spec itself: the model's files
    (context, chat template; ``modelcheck``), the chunk window against the prompt budget, and,
    for a new plan, that ids are unique across the input. ``batchgen plan`` runs the same."""
    model = local_model(spec, weights=False)[0]
    checked = check_model(model, spec.generation, spec.input)
    if spec.input.long_documents == "chunk" and spec.model.engine != "echo":
        tokenizer = light_tokenizer(model)  # None without tokenizer.json: rows are checked
        if tokenizer is not None:
            longdocs.check_windows(spec, tokenizer, checked["max_input_tokens"])
    if new_plan:
        check_unique_ids(spec, plan)
    return checked


def end_status(out: Storage, progress: JobProgress, state: str, message: str) -> None:
    """Record how a run ended, on the way out of an error: a storage error here must not
    replace the error being raised, which says more."""
    progress.finish(state, message)
    try:
        out.write_json(layout.STATUS, progress.status())
    except Exception:  # noqa: BLE001
        pass


def resume_command(spec: JobSpec, *, retry_failed: bool = False) -> str:
    endpoint = f" --endpoint-url {spec.storage.endpoint_url}" if spec.storage.endpoint_url else ""
    retry = " --retry-failed" if retry_failed else ""
    return f"batchgen resume {spec.output.path}{endpoint}{retry}"


def _plan_or_resume(spec: JobSpec, as_given: JobSpec, out: Storage, force: bool,
                    say: Say) -> tuple[Plan, bool, dict[str, Any] | None]:
    """(plan, whether it is new, the job.json to write with it or None). The stored plan if
    this output already holds this job, else a new one. Nothing is written here: the caller
    writes once the model check has passed too.

    A stored plan is never re-cut: shard ids and row ranges stay as they were. A plan of an
    earlier fingerprint version that matches is brought to the current one (same shards), so
    from then on every output-changing key is watched."""
    stored = out.read_json_or_none(layout.PLAN)
    if stored is None:
        plan = make_plan(spec)
        return plan, True, _job_doc(spec, plan)
    try:
        old = Plan.from_json(stored)
    except BatchgenError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StorageError(f"{out.url_of(layout.PLAN)}: not a batchgen plan ({type(e).__name__}: "
                           f"{e}); use a new output.path or remove the old output") from None
    if old.fingerprint_version > FINGERPRINT_VERSION:
        raise StorageError(
            f"{out.url_of(layout.PLAN)} was written by a newer batchgen (fingerprint version "
            f"{old.fingerprint_version}; this one knows {FINGERPRINT_VERSION}); resume it with "
            "that version")
    fingerprint, parts = current_fingerprint(spec, old.fingerprint_version, as_given)
    if old.fingerprint == fingerprint and old.fingerprint_version == FINGERPRINT_VERSION:
        return old, False, None
    parts_changed = [k for k, v in parts.items() if old.fingerprint_parts.get(k) != v]
    if old.fingerprint_version < 3:  # before the engine was a part: engine version 1
        parts_changed.append("engine")
    changed = changes(parts_changed, spec, _stored_spec(out), old.files,
                      old.fingerprint_version, as_given)
    if "engine" in parts_changed:
        changed.append("the engine's version (or, with generation.structured, llguidance's), so "
                       "sampled text from this batchgen differs from the committed shards'")
    if not force:
        raise StorageError(
            f"output.path {spec.output.path} holds a different job (changed: "
            f"{'; '.join(changed)}); use a new output.path, remove the old output, or resume "
            "anyway with --force (committed shards keep their outputs)"
        )
    say(f"--force: resuming although {'; '.join(changed)} changed; committed shards keep their "
        "outputs, the rest run with the new settings")
    fingerprint, parts = current_fingerprint(spec)
    forced = Plan(fingerprint, parts, old.files, old.shards)
    return forced, False, {**_job_doc(spec, forced), "forced_from": old.fingerprint}


def _stored_spec(out: Storage) -> dict[str, Any] | None:
    """The spec in the output's job.json, to name the keys that changed; None if it is missing
    or damaged (the refusal then names the parts of the fingerprint)."""
    try:
        job = out.read_json_or_none(layout.JOB)
    except (OSError, ValueError):  # unreadable, not JSON, not UTF-8
        return None
    return job.get("spec") if isinstance(job, dict) else None


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
        "fingerprint_version": plan.fingerprint_version,
        "versions": versions,
        "created_at": now_iso(),
    }


