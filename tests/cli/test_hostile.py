"""Hostile and mistaken input: each case is refused with one `error:` line, exit status 2, no
traceback, and nothing written.

One table: the files a case starts from, the command, and a fragment of the message. `{job}` is a
job file written from the case's YAML, `{out}` the output directory.
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, spec_dict

from batchgen.cli import main


def job_yaml(**sections) -> str:
    """A job file's YAML; dict values update whole sections, others (mode) are set as they are."""
    raw = spec_dict("in", "{out}", "m", **{k: v for k, v in sections.items() if isinstance(v, dict)})
    return yaml.safe_dump({**raw, **{k: v for k, v in sections.items() if not isinstance(v, dict)}})


GOOD = job_yaml()
OK_INPUT = "input: {path: in, prompt_column: prompt}\nmodel: {path: m}\n"


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# The spec of a job.json as `batchgen run` writes it: storage options already redacted.
JOB_JSON = ('{"spec": {"input": {"path": "in", "prompt_column": "prompt"}, "model": {"path": "m"},'
            ' "output": {"path": "x"}}}')

CASES = [
    # id, job YAML (None: no job file), files under {out} (None: {out} is a regular file),
    # argv, fragment of the message
    # -- empty and root paths (finding 12): `-o "$OUT"` with OUT unset wrote the job into /
    ("run -o ''", GOOD, {}, ["run", "{job}", "-o", ""],
     "Invalid value for '-o' / '--output': must not be empty"),
    ("plan -o blank", GOOD, {}, ["plan", "{job}", "-o", "  "],
     "Invalid value for '-o' / '--output': must not be empty"),
    ("output.path ''", job_yaml(output={"path": ""}), {}, ["run", "{job}"],
     "job.yaml: output.path: must not be empty"),
    ("--set output.path=", GOOD, {}, ["run", "{job}", "--set", "output.path="],
     "job.yaml: output.path: must not be empty"),
    ("output.path /", OK_INPUT + "output: {path: /}\n", {}, ["run", "{job}"],
     "job.yaml: output.path: must not be the filesystem root"),
    ("output.path s3://", OK_INPUT + "output: {path: 's3://'}\n", {}, ["run", "{job}"],
     "job.yaml: output.path: names no bucket"),
    ("input.path ''", "input: {path: ''}\nmodel: {path: m}\noutput: {path: '{out}'}\n", {},
     ["plan", "{job}"], "job.yaml: input.path: must not be empty"),
    ("input.path /", "input: {path: /}\nmodel: {path: m}\noutput: {path: '{out}'}\n", {},
     ["plan", "{job}"], "job.yaml: input.path: must not be the filesystem root"),
    ("status ''", None, {}, ["status", ""], "Invalid value for 'TARGET': must not be empty"),
    ("show ''", None, {}, ["show", ""], "Invalid value for 'OUTPUT': must not be empty"),
    ("resume ''", None, {}, ["resume", ""], "Invalid value for 'OUTPUT': must not be empty"),
    # -- YAML that parses but is wrong (findings 14, 16, 17)
    ("duplicate section", OK_INPUT + "output: {path: '{out}'}\ninput: {path: other}\n", {},
     ["plan", "{job}"], "job.yaml: line 4: duplicate key 'input'"),
    ("duplicate nested key", "input: {path: in, path: other}\nmodel: {path: m}\n"
     "output: {path: '{out}'}\n", {}, ["plan", "{job}"], "job.yaml: line 1: duplicate key 'path'"),
    ("recursive alias", "a: &a [x, *a]\n", {}, ["plan", "{job}"],
     "job.yaml: line 1: an alias refers to a node that contains it"),
    ("top level a list, --set", "- input\n- model\n", {},
     ["run", "{job}", "--set", "generation.n=2"], "got a YAML list"),
    ("top level a string, -o", "just a sentence\n", {}, ["run", "{job}", "-o", "{out}"],
     "got a YAML string"),
    ("not UTF-8", b"# caf\xe9\n" + GOOD.encode(), {}, ["plan", "{job}"],
     "job.yaml: line 1: not UTF-8 text (byte 0xe9)"),
    ("plan --sample 0", GOOD, {}, ["plan", "{job}", "--sample", "0"],
     "Invalid value for '--sample': 0 is not in the range x>=1"),
    ("plan --sample -1", GOOD, {}, ["plan", "{job}", "--sample", "-1"],
     "Invalid value for '--sample': -1 is not in the range x>=1"),
    # -- credentials never come from the spec (finding 9), at any depth, never echoed
    ("credentials", job_yaml(storage={"options": {"key": "AKIAHOSTILE", "secret": "hunter2"}}),
     {}, ["run", "{job}"], "storage.options: credentials do not belong in the spec "
     "(storage.options.key, storage.options.secret); take them from the environment"),
    ("nested credentials", job_yaml(storage={"options": {
        "client_kwargs": {"aws_secret_access_key": "hunter2"}, "config_kwargs": {"aws_secret": "x"}}}),
     {}, ["submit", "{job}", "--address", "http://127.0.0.1:9"],
     "(storage.options.client_kwargs.aws_secret_access_key, storage.options.config_kwargs.aws_secret)"),
    # -- an OUTPUT that is damaged or not batchgen's (finding 17)
    ("status.json not JSON", None, {"status.json": b"{oops"}, ["status", "{out}"],
     "out/status.json: not valid JSON"),
    ("status.json a list", None, {"status.json": b"[1, 2]"}, ["status", "{out}"],
     "out/status.json: expected a JSON object, got list"),
    ("status.json keys missing", None, {"status.json": b'{"state": "running"}'},
     ["status", "{out}"], "out/status.json: missing or malformed shards, request_counts"),
    ("status.json no total", None, {"status.json": b'{"state": "x", "shards": {}, '
     b'"request_counts": {}}'}, ["status", "{out}"], "missing or malformed shards.total"),
    ("status.json not UTF-8", None, {"status.json": b'{"state": "\xe9"}'}, ["status", "{out}"],
     "out/status.json: not valid JSON"),
    ("plan.json keys missing", None, {"plan.json": b'{"files": []}'}, ["status", "{out}"],
     "out/plan.json: missing or malformed shards"),
    ("job.json not JSON", None, {"job.json": b"not json"}, ["resume", "{out}"],
     "out/job.json: not valid JSON"),
    ("job.json a list", None, {"job.json": b"[]"}, ["resume", "{out}"],
     "out/job.json: expected a JSON object, got list"),
    ("job.json no spec", None, {"job.json": b'{"fingerprint": "x"}'}, ["resume", "{out}"],
     "out/job.json: missing or malformed spec"),
    ("job.json output not a mapping", None,
     {"job.json": JOB_JSON.replace('{"path": "x"}', '"x"').encode()}, ["resume", "{out}"],
     "out/job.json: spec.output is not a mapping"),
    ("data file not Parquet", None, {"data/part-000000.parquet": b"garbage"}, ["show", "{out}"],
     "out/data/part-000000.parquet: not a readable Parquet file"),
    ("data file not batchgen's", None,
     {"data/part-000000.parquet": parquet(pa.table({"row_id": ["a"]}))}, ["show", "{out}"],
     "part-000000.parquet: not a batchgen output file (no column sample_index, finish_reason, "
     "generation, error)"),
    ("status of a file", None, None, ["status", "{out}"], "out: is a file, not a job's output"),
    ("show a file", None, None, ["show", "{out}"], "out: is a file, not a job's output"),
    ("resume a file", None, None, ["resume", "{out}"], "out: is a file, not a job's output"),
    ("show -n 0", None, {}, ["show", "{out}", "-n", "0"],
     "Invalid value for '-n' / '--rows': 0 is not in the range x>=1"),
    ("show -n -3", None, {}, ["show", "{out}", "-n", "-3"],
     "Invalid value for '-n' / '--rows': -3 is not in the range x>=1"),
    # -- round 2 (issue 18): constraints the library cannot follow, refused at load ------------
    ("schema that can never complete", job_yaml(generation={"structured": {"json_schema": {
        "$ref": "#"}}}), {}, ["plan", "{job}"],
     "job.yaml: generation.structured: json_schema: no text can satisfy it (llguidance: "
     "NoExtensionBias"),
    ("regex that matches nothing", job_yaml(generation={"structured": {"regex": "[^\\s\\S]"}}),
     {}, ["plan", "{job}"], "job.yaml: generation.structured: regex: no text can satisfy it"),
    ("grammar that never ends", job_yaml(generation={"structured": {"grammar": 'start: "ab" start'}}),
     {}, ["plan", "{job}"], "job.yaml: generation.structured: grammar: llguidance cannot follow "
     "it: parser error: Too many items"),
    ("schema with a NaN bound", OK_INPUT + "output: {path: '{out}'}\ngeneration: {structured: "
     "{json_schema: {type: number, maximum: .nan}}}\n", {}, ["plan", "{job}"],
     "generation.structured: json_schema: not a valid JSON Schema: maximum: NaN is not a number "
     "JSON can hold"),
    ("output schema with an infinite bound", OK_INPUT + "output: {path: '{out}', parse: json, "
     "json_schema: {properties: {a: {minimum: -.inf}}}}\n", {}, ["plan", "{job}"],
     "output: json_schema is not a valid JSON Schema: properties/a/minimum: -Infinity is not a "
     "number JSON can hold"),
    ("score with stop strings", job_yaml(mode="score", input={"completion_column": "c"},
                                         generation={"stop": ["\n"], "dedupe": True}),
     {}, ["plan", "{job}"], "mode: score takes no generation.stop, generation.dedupe: scores are "
     "the model's own log-probabilities"),
    ("score with ignore_eos and reasoning", job_yaml(mode="score", input={"completion_column": "c"},
                                                     generation={"ignore_eos": True,
                                                                 "reasoning_end": "</think>"}),
     {}, ["plan", "{job}"], "mode: score takes no generation.ignore_eos, generation.reasoning_end"),
    ("--set choice of YAML booleans", GOOD, {},
     ["plan", "{job}", "--set", "generation.structured.choice=[yes, no]"],
     "generation.structured.choice: item 1 is a YAML boolean (an unquoted yes/no/on/off/true/"
     "false), not text; quote each item, e.g. ['yes', 'no']"),
    ("a YAML boolean for a number", GOOD, {}, ["run", "{job}", "--set", "generation.top_k=no"],
     "generation.top_k: expected a number, not a YAML boolean"),
]


def snapshot(root) -> dict[str, bytes]:
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def no_driver(monkeypatch):
    """A job that gets past the checks reaches this driver, which fails the test."""
    driver = types.ModuleType("batchgen.job.driver")

    def run_job(spec, **kwargs):
        raise AssertionError(f"reached the driver with output.path={spec.output.path!r}")

    driver.run_job = run_job
    monkeypatch.setitem(sys.modules, "batchgen.job.driver", driver)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line(case, tmp_path, monkeypatch, no_driver):
    _, job, files, argv, fragment = case
    monkeypatch.chdir(tmp_path)  # an empty path taken for "here" or "/" would show up in it
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    if files is None:
        out.write_text("a regular file\n")
    elif files:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    if job is not None:
        text = job if isinstance(job, bytes) else job.encode()
        (tmp_path / "job.yaml").write_bytes(text.replace(b"{out}", str(out).encode()))
    before, here = snapshot(out), sorted(os.listdir(tmp_path))

    args = [a.replace("{job}", str(tmp_path / "job.yaml")).replace("{out}", str(out))
            for a in argv]
    r = CliRunner().invoke(main, args)

    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert fragment in lines[0]
    assert "hunter2" not in r.output and "AKIAHOSTILE" not in r.output
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == here


def test_alias_bomb_is_refused_fast_in_little_memory(tmp_path):
    # Nine levels of nine aliases: 358 bytes, 9**9 (387M) strings once expanded, which took
    # more than 6 GB before the loader counted nodes. A subprocess with a 1 GiB address-space
    # cap fails with MemoryError instead of eating the machine if that ever comes back.
    levels = "abcdefghi"
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip(levels, levels[1:]))
    job = tmp_path / "job.yaml"
    job.write_text(text + "input: {path: in}\nmodel: {path: m}\noutput: {path: out}\n")
    cap = 1 << 30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run([str(BIN / "batchgen"), "plan", str(job)], capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"error: {job}: more than 100000 YAML nodes once aliases are expanded (an alias bomb?); "
        "write the spec out without nested &anchors/*aliases")


def test_storage_refuses_an_empty_path():
    # Defence in depth behind the spec and the CLI: "" once became "/".
    from batchgen.errors import StorageError
    from batchgen.io.storage import Storage

    for url in ("", "  "):
        with pytest.raises(StorageError, match="empty storage path"):
            Storage(url)
