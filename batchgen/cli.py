"""The ``batchgen`` command: a thin Click layer over spec, plan, driver and storage.

Heavy imports (torch, transformers, ray) happen inside commands, so ``batchgen --help`` is
instant. A ``BatchgenError`` becomes one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

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
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _spec_options(f):
    f = click.option(
        "--replicas", type=int, default=None, help="Overrides resources.replicas."
    )(f)
    f = click.option(
        "-o", "--output", default=None, metavar="PATH", help="Overrides output.path."
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
    from batchgen.spec import load_spec

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
@click.argument("job", type=click.Path(dir_okay=False))
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
@click.argument("output")
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
    from batchgen.status import stored_spec

    extra = list(overrides) + ([f"resources.replicas={replicas}"] if replicas is not None else [])
    _run(stored_spec(output, endpoint_url, extra), address, progress, force, retry_failed)


def _run(spec, address, progress, force, retry_failed) -> None:
    from batchgen.driver import run_job

    s = run_job(spec, address=address, live=progress, force=force, retry_failed=retry_failed)
    click.echo(
        f"completed: {s.rows} rows, {s.outputs} outputs ({s.errors} errors), "
        f"{s.generated_tokens} tokens in {s.seconds:.1f}s "
        f"({s.tokens_per_second:.1f} tok/s) -> {s.output}"
    )


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_spec_options
@click.option("--sample", default=256, show_default=True, help="Rows tokenized for the estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
def plan(job, overrides, output, replicas, sample, as_json):
    """Show the shards JOB would run and a prompt-token estimate; runs no model."""
    spec = _load(job, overrides, output, replicas)
    from batchgen.plan import make_plan
    from batchgen.worker import estimate_prompt_tokens

    p = make_plan(spec)
    per_row = estimate_prompt_tokens(spec, p, sample=sample)
    summary = {
        "files": len(p.files),
        "rows": p.total_rows,
        "shards": len(p.shards),
        "samples": p.total_rows * spec.generation.n,
        "prompt_tokens_per_row": round(per_row, 1),
        "prompt_tokens_estimate": round(per_row * p.total_rows * spec.generation.n),
        "max_new_tokens_total": p.total_rows * spec.generation.n * spec.generation.max_new_tokens,
        "fingerprint": p.fingerprint,
    }
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


@main.command()
@click.argument("output")
@click.option("--endpoint-url", default=None, help="S3 endpoint, as storage.endpoint_url.")
@click.option("--json", "as_json", is_flag=True, help="Print status.json as is.")
def status(output, endpoint_url, as_json):
    """Show the state of the job whose output is OUTPUT (local or s3://); no cluster needed."""
    from batchgen.status import read_status

    st = read_status(output, endpoint_url)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    sh, rc = st["shards"], st["request_counts"]
    click.echo(f"state:    {st['state']}")
    click.echo(f"shards:   {sh['completed']}/{sh['total']} committed, {sh['failed']} failed")
    click.echo(f"requests: {rc['completed']}/{rc['total']} completed, {rc['failed']} failed")
    if st.get("tokens"):
        click.echo(
            f"tokens:   {st['tokens']['generated']} generated, {st.get('tokens_per_second', 0)} tok/s"
        )
    if st.get("eta_seconds") is not None and st["state"] == "in_progress":
        click.echo(f"eta:      {st['eta_seconds']:.0f}s")
    if st.get("error"):
        click.echo(f"error:    {st['error']}")


@main.command()
@click.argument("output")
@click.option("-n", "--rows", default=5, show_default=True, help="Rows to show.")
@click.option("--endpoint-url", default=None, help="S3 endpoint, as storage.endpoint_url.")
def show(output, rows, endpoint_url):
    """Print the first rows of a job's output (local or s3://)."""
    from batchgen.status import head_rows

    for r in head_rows(output, rows, endpoint_url):
        text = (r["generation"] if r["error"] is None else f"ERROR: {r['error']}") or ""
        click.echo(f"{r['row_id']}#{r['sample_index']} [{r['finish_reason']}] {text!r}")


@main.command("init-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def init_model(directory, seed):
    """Build the tiny offline test model into DIRECTORY (loadable with from_pretrained)."""
    from batchgen.tinymodel import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    click.echo(f"tiny model written to {path}")


if __name__ == "__main__":
    main()
