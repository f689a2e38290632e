"""Every example job in jobs/ is a valid spec whose local input exists."""

from pathlib import Path

import pytest
from conftest import REPO

from batchgen.job.plan import make_plan
from batchgen.spec.load import load_spec

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_there_are_example_jobs():
    assert any(p.name == "demo.yaml" for p in JOBS)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_file_is_a_valid_spec(path, monkeypatch):
    monkeypatch.chdir(REPO)  # jobs use paths relative to the repo root, as `make demo` runs them
    spec = load_spec(path)
    if "://" not in spec.input.path:
        plan = make_plan(spec)
        assert plan.total_rows > 0 and plan.shards
    assert not Path(spec.output.path).is_absolute() or "://" in spec.output.path
