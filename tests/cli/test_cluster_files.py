"""Every file in cluster/ parses, and every batchgen command in it names a real command and,
where it runs a job, a job file of this repository."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml
from conftest import REPO

from batchgen.cli import main
from batchgen.spec.load import load_spec

CLUSTER = REPO / "cluster"
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
IMAGE_ROOT = "/app/"  # where cluster/Dockerfile puts the repository's files


COMMAND = re.compile(r"(?:^|`|&&|;|\$\(|:)\s*(?:[\w./-]*/)?batchgen\s+([^`\n;&|)]*)")


def batchgen_commands(text: str) -> list[list[str]]:
    """Every `batchgen ...` invocation in a file: at the start of a (comment) line, in a YAML
    value, after a shell separator or inside backticks; prose mentions are not commands."""
    found = []
    for line in text.splitlines():
        line = re.sub(r"^\s*#+", "", line)
        for m in COMMAND.finditer(line):
            words = m.group(1).split(" #")[0].strip(" \\\"'").split()
            if words and not words[0].startswith("-"):
                found.append(words)
    return found


def test_the_command_finder_finds_commands_not_prose():
    text = ("#   batchgen submit jobs/demo.yaml --wait\nentrypoint: batchgen run x.yaml\n"
            "the batchgen driver only\nrun `batchgen logs ID --follow` then\n"
            "  .venv/bin/batchgen status ID && batchgen list\n")
    assert [w[0] for w in batchgen_commands(text)] == ["submit", "run", "logs", "status", "list"]


def test_cluster_folder_has_what_users_need():
    names = {p.relative_to(CLUSTER).as_posix() for p in FILES}
    assert {"README.md", "Dockerfile", "local-cluster.sh", "ray-up-aws.yaml",
            "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_file_parses_and_its_batchgen_commands_are_real(path):
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f"{path} holds no YAML document"
    elif path.suffix == ".sh":
        subprocess.run(["bash", "-n", str(path)], check=True)
    for words in batchgen_commands(text):
        assert words[0] in main.commands, f"{path}: `batchgen {' '.join(words)}`: no such command"
        for w in words[1:]:
            if w.endswith((".yaml", ".yml")) and "jobs/" in w:
                job = REPO / w.removeprefix(IMAGE_ROOT)
                assert job.is_file(), f"{path}: `batchgen {' '.join(words)}`: no {job}"
                load_spec(job)


def test_kuberay_manifests_have_gpu_workers_token_auth_and_an_entrypoint():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
        gpu = [g for g in spec["workerGroupSpecs"]
               if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                   "nvidia.com/gpu")]
        assert gpu, "no GPU worker group"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["batchgen", "run"] and (REPO / words[2].removeprefix(IMAGE_ROOT)).is_file()


def test_ray_up_config_has_gpu_workers():
    config = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    head = config["head_node_type"]
    assert config["available_node_types"][head]["resources"] == {"CPU": 0}
    workers = [t for name, t in config["available_node_types"].items() if name != head]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert config["docker"]["image"]
