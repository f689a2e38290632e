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


def test_the_readme_spec_shows_every_key_with_its_default():
    """README's "A job spec" block is every key of the spec at its default (the three paths
    have none): it mixed example values and defaults, and the real defaults differed."""
    import re

    import yaml
    from pydantic import BaseModel

    from batchgen.spec import JobSpec

    text = (REPO / "README.md").read_text()
    block = re.search(r"## A job spec\n.*?```yaml\n(.*?)```", text, re.S).group(1)
    shown = yaml.safe_load(block)
    required = {("input", "path"), ("model", "path"), ("output", "path")}

    def check(model: type[BaseModel], values: dict, where: tuple[str, ...]) -> None:
        fields = {f.alias or name: (name, f) for name, f in model.model_fields.items()}
        assert set(values) == set(fields), (where, set(values) ^ set(fields))
        for key, value in values.items():
            name, field = fields[key]
            if where + (key,) in required:
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                check(annotation, value, where + (key,))
                continue
            default = field.get_default(call_default_factory=True)
            default = list(default) if isinstance(default, tuple) else default
            assert value == default, (".".join(where + (key,)), value, default)

    check(JobSpec, shown, ())
