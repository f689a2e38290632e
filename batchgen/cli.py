"""The ``batchgen`` command: a thin Click layer over spec, plan, driver and storage.

Heavy imports (torch, transformers, ray) happen inside commands, so ``batchgen --help`` is
instant. A ``BatchgenError`` or a bad option value becomes one ``error: ...`` line and exit
status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from batchgen.errors import BatchgenError, Cancelled


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Cancelled as e:
            click.secho(f"cancelled: {e}", fg="yellow", err=True)
            # Status, lock and Ray are already taken care of. Skip the interpreter's teardown
            # (~2 s in Ray's and torch's finalizers): `ray job stop` and schedulers send
            # SIGKILL 3 s after SIGTERM.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except BatchgenError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except click.BadParameter as e:  # a bad value is a user mistake too: one line
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
            click.secho(f"error: {e.format_message()}{where}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # `-o "$OUT"` with OUT unset is "", which Storage once took for "/".
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty (is a shell variable unset?)", ctx, param)
    return value


def _spec_options(f):
    f = click.option(
        "--replicas", type=int, default=None, help="Overrides resources.replicas."
    )(f)
    f = click.option(
        "-o", "--output", default=None, metavar="PATH", callback=_not_empty,
        help="Overrides output.path.",
    )(f)
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Overrides any spec key, e.g. --set generation.temperature=0.7 (repeatable).",
    )(f)
    return f


def _resume_options(f):
    f = click.option(
        "--retry-failed",
        is_flag=True,
        help="Also run again the rows whose finish_reason is 'error' in committed shards; "
        "every other row stays as it is.",
    )(f)
    f = click.option(
        "--force",
        is_flag=True,
        help="Resume even if the job changed (input files, model, prompt or generation "
        "settings); committed shards keep their outputs.",
    )(f)
    return f


def _load(job: str, overrides: tuple[str, ...], output: str | None, replicas: int | None):
    from batchgen.spec.load import load_spec

    extra = list(overrides)
    if output is not None:
        extra.append(f"output.path={json.dumps(output)}")
    if replicas is not None:
        extra.append(f"resources.replicas={replicas}")
    return load_spec(job, extra)


@click.group(cls=_Group)
@click.version_option(package_name="batchgen")
def main() -> None:
    """Batch text generation over Parquet datasets with Hugging Face models on Ray."""


@main.command()
@click.argument("job", type=click.Path(dir_okay=False), callback=_not_empty)
@_spec_options
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join (e.g. 127.0.0.1:6379 or auto). Default: RAY_ADDRESS, else a "
    "private local Ray.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress bar (default: on a terminal); otherwise a log line every 10 s.",
)
@_resume_options
def run(job, overrides, output, replicas, address, progress, force, retry_failed):
    """Run JOB (a YAML spec) to completion. Re-running a job on its output resumes it."""
    spec = _load(job, overrides, output, replicas)
    _run(spec, address, progress, force, retry_failed)


@main.command()
@click.argument("output", callback=_not_empty)
@click.option("--endpoint-url", default=None, help="S3 endpoint of OUTPUT, as storage.endpoint_url.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Overrides a key of the stored spec (a change to outputs needs --force).",
)
@click.option("--replicas", type=int, default=None, help="Overrides resources.replicas.")
@click.option("--address", default=None, help="Ray cluster to join; as for run.")
@click.option("--progress/--no-progress", default=None, help="As for run.")
@_resume_options
def resume(output, endpoint_url, overrides, replicas, address, progress, force, retry_failed):
    """Resume the job whose output is OUTPUT, with the spec stored there (job.json).

    Committed shards are skipped; the rest, including shards that failed, run again."""
    from batchgen.job.status import stored_spec

    extra = list(overrides) + ([f"resources.replicas={replicas}"] if replicas is not None else [])
    _run(stored_spec(output, endpoint_url, extra), address, progress, force, retry_failed)


def _run(spec, address, progress, force, retry_failed) -> None:
    from batchgen.job.driver import run_job

    summary = run_job(spec, address=address, live=progress, force=force,
                      retry_failed=retry_failed)
    click.echo(summary.line())


@main.command()
@click.argument("job", type=click.Path(dir_okay=False), callback=_not_empty)
@_spec_options
@click.option("--sample", default=256, show_default=True, type=click.IntRange(min=1),
              help="Rows tokenized for the estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
def plan(job, overrides, output, replicas, sample, as_json):
    """Show the shards JOB would run and a prompt-token estimate; runs no model."""
    spec = _load(job, overrides, output, replicas)
    from batchgen.job.estimate import plan_summary
    from batchgen.job.status import printable

    p, summary = plan_summary(spec, sample=sample)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"input:   {len(p.files)} file(s), {p.total_rows} rows")
    click.echo(f"shards:  {len(p.shards)} of up to {spec.resources.shard_rows} rows")
    for s in p.shards[:5]:
        click.echo(f"  {s.shard_id}  {s.file}  rows {s.row_start}..{s.row_start + s.row_count - 1}")
    if len(p.shards) > 5:
        click.echo(f"  ... {len(p.shards) - 5} more")
    click.echo(
        f"prompts: ~{summary['prompt_tokens_per_row']} tokens/row, "
        f"~{summary['prompt_tokens_estimate']} prompt tokens for "
        f"{summary['samples']} samples; at most {summary['max_new_tokens_total']} new tokens"
    )
    if summary["sampled_error_rows"]:
        click.secho(f"warning: {summary['sampled_error_rows']} of the {summary['sampled_rows']} "
                    f"rows sampled would be error rows, e.g.: {printable(summary['first_error'])}",
                    fg="yellow", err=True)


@main.command()
@click.argument("target", callback=_not_empty)
@click.option("--endpoint-url", default=None, help="S3 endpoint, as storage.endpoint_url.")
@click.option(
    "--address",
    default=None,
    help="Ray Jobs API (http://HEAD:8265) when TARGET is a submitted job's id; default "
    "RAY_ADDRESS.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(target, endpoint_url, address, as_json):
    """Show a job's state. TARGET is its output (local or s3://; no cluster needed) or the id
    `batchgen submit` printed (Ray's state plus the job's own status.json)."""
    from batchgen.job.status import format_status, printable, read_status

    if not _is_job_id(target) or not (address or os.environ.get("RAY_ADDRESS")):
        st = read_status(target, endpoint_url)
        click.echo(json.dumps(st, indent=2) if as_json else format_status(st))
        return
    from batchgen.submission import Cluster, JobView

    view = JobView.of(Cluster(address).info(target))
    st, problem = None, None
    if view.output:
        try:
            st = read_status(view.output, endpoint_url or view.endpoint_url)
        except BatchgenError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - storage not reachable from here, say why
            problem = f"{view.output}: cannot read the job's status from here: {e}"
    if as_json:
        click.echo(json.dumps({"job_id": view.job_id, "ray": view.ray_state,
                               "message": view.message, "output": view.output,
                               "status": st, "status_error": problem}, indent=2))
        return
    click.echo(f"job:      {view.job_id}")
    click.echo(f"ray:      {view.ray_state}" +
               (f" ({printable(view.message)})" if view.message else ""))
    click.echo(f"output:   {printable(view.output) or '(not a batchgen job)'}")
    if st is not None:
        click.echo(format_status(st))
    elif problem:
        click.echo(f"status:   unavailable: {problem}")


def _is_job_id(target: str) -> bool:
    """A submission id has no slashes and is not a local path (looked up only with an address;
    without one TARGET is an output, and a missing one says so)."""
    return "/" not in target and "://" not in target and not os.path.exists(target)


# -- a remote cluster, through Ray's Jobs API ---------------------------------------------------

_ADDRESS = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="The cluster's Ray Jobs API, e.g. http://HEAD:8265; default RAY_ADDRESS. The token "
    "comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False), callback=_not_empty)
@_spec_options
@_ADDRESS
@click.option(
    "--working-dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Local code shipped with the job (runtime_env working_dir, importable on the cluster). "
    "Relative paths in the spec are resolved here, before submitting.",
)
@click.option(
    "--env",
    "env_names",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="Environment variable for the job (e.g. AWS_ACCESS_KEY_ID); without a value it is "
    "taken from here. Repeatable.",
)
@click.option("--pip", multiple=True, metavar="REQ", help="Extra pip requirement on the cluster.")
@click.option("--wait", is_flag=True, help="Follow the job's log to its end; exit 1 unless it "
              "succeeded.")
@_resume_options
def submit(job, overrides, output, replicas, address, working_dir, env_names, pip, wait, force,
           retry_failed):
    """Submit JOB to a Ray cluster as a Ray job running `batchgen run`; prints its id.

    Submitting a job again after it stopped or failed resumes it (same output, next run
    number); while it runs, a second submission is refused."""
    from batchgen.job.plan import resolve_local_paths
    from batchgen.submission import Cluster, env_vars, is_loopback, local_paths, spec_yaml

    # Resolved here, as `batchgen run` from this directory resolves them: the job means the same
    # on the cluster, and resubmitting it (or running it locally) finds the same fingerprint.
    spec = resolve_local_paths(_load(job, overrides, output, replicas))
    spec_yaml(spec)  # refuses inline credentials before anything is sent
    env = env_vars(env_names)
    cluster = Cluster(address)
    if not is_loopback(cluster.address):
        for key in local_paths(spec):
            click.secho(f"warning: {key} is a local path; on the cluster it is read on the head "
                        "node's disk", fg="yellow", err=True)
    run_args = (["--force"] if force else []) + (["--retry-failed"] if retry_failed else [])
    job_id = cluster.submit(spec, working_dir=working_dir, env=env, pip=list(pip),
                            run_args=run_args)
    click.echo(job_id)
    if not wait:
        click.echo(f"follow with: batchgen logs {job_id} --follow --address {cluster.address}",
                   err=True)
        return
    for chunk in cluster.follow(job_id):
        click.echo(chunk, nl=False)
    state = cluster.wait(job_id)
    click.echo(f"{job_id}: {state}", err=True)
    if state != "SUCCEEDED":
        sys.exit(1)


@main.command()
@click.argument("job_id")
@_ADDRESS
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
def logs(job_id, address, follow):
    """Print the log of a submitted job (its `batchgen run` output)."""
    from batchgen.submission import Cluster

    cluster = Cluster(address)
    if follow:
        for chunk in cluster.follow(job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(cluster.logs(job_id), nl=False)


@main.command()
@click.argument("job_id")
@_ADDRESS
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for it to end.")
def stop(job_id, address, timeout):
    """Stop a submitted job. It ends `cancelled` with its committed shards kept; submit the
    same job again to resume it."""
    from batchgen.submission import Cluster

    state = Cluster(address).stop(job_id, timeout)
    click.echo(f"{job_id}: {state}")
    if state not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise BatchgenError(f"{job_id} is still {state} after {timeout:.0f}s")


@main.command("list")
@_ADDRESS
@click.option("--all", "show_all", is_flag=True, help="Also Ray jobs not submitted by batchgen.")
def list_jobs(address, show_all):
    """List the jobs on a cluster, oldest first."""
    from batchgen.job.status import printable
    from batchgen.submission import Cluster, JobView

    views = sorted((JobView.of(j) for j in Cluster(address).list()),
                   key=lambda v: v.start_time or 0)
    for v in views:
        if not (v.output or show_all):
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.start_time)) \
            if v.start_time else "-"
        click.echo(f"{printable(v.job_id):<44} {v.ray_state:<10} {started}  "
                   f"{printable(v.output) or '-'}")


@main.command()
@click.argument("output", callback=_not_empty)
@click.option("-n", "--rows", default=5, show_default=True, type=click.IntRange(min=1),
              help="Rows to show.")
@click.option("--endpoint-url", default=None, help="S3 endpoint, as storage.endpoint_url.")
def show(output, rows, endpoint_url):
    """Print the first rows of a job's output (local or s3://)."""
    from batchgen.job.status import head_rows, printable

    for r in head_rows(output, rows, endpoint_url):
        text = (r["generation"] if r["error"] is None else f"ERROR: {r['error']}") or ""
        extra = ""
        if r["error"] is None and r.get("completion_logprob") is not None:  # mode: score
            text = r["completion"]
            extra = f" logprob {r['completion_logprob']:.3f}, perplexity {r['perplexity']:.3g}"
        elif r.get("tool_calls"):
            extra = " calls " + ", ".join(f"{c['name']}({c['arguments']})" for c in r["tool_calls"])
        click.echo(f"{printable(str(r['row_id']))}#{r['sample_index']} "
                   f"[{printable(str(r['finish_reason']))}] {text!r}{printable(extra)}")


@main.command("init-model")
@click.argument("directory", type=click.Path(file_okay=False), callback=_not_empty)
@click.option("--seed", default=0, show_default=True)
def init_model(directory, seed):
    """Build the tiny offline test model into DIRECTORY (loadable with from_pretrained)."""
    from batchgen.tinymodel import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    click.echo(f"tiny model written to {path}")


if __name__ == "__main__":
    main()
