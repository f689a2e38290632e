"""The package's layout: wings by role, imports pointing one way, no cycles, small modules.

    cli.py, submission.py, tinymodel.py   the top: may import anything below
    job/        the driver side (the only Ray users, with submission.py's Jobs SDK)
    shard/      one shard on one replica (no Ray)
    engine/     ids in, ids out (no Ray, no storage)
    io/         storage, the model cache, model files (no torch)
    spec/       the job spec (no torch, no storage)
    errors.py   under everything

Every import is read from the source, the lazy ones inside functions too: an import that
points back up fails here, whether or not any test happens to execute it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchgen"
FLOORS = {"errors": 0, "spec": 1, "io": 2, "engine": 3, "shard": 4, "job": 5,
          "cli": 6, "submission": 6, "tinymodel": 6}
MAX_LINES = 400
# Third-party imports each wing must never make, at any depth (lazy ones included).
FORBIDDEN = {
    "spec": {"torch", "transformers", "ray", "fsspec", "s3fs"},
    "io": {"torch", "transformers", "ray"},
    "engine": {"ray", "fsspec", "s3fs"},
    "shard": {"ray"},
    # The driver side loads no torch (estimate.py's fallback for a model without tokenizer.json
    # goes through engine/loading.py, lazily, and says so).
    "job": {"torch", "transformers"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "batchgen"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth. A relative import is named
    ``.`` plus its module: the package spells every import out, so the rules can read it."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            # `from batchgen.x import y` may name a module y
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
    return out


def _upward(modules: dict[str, Path]) -> list[str]:
    """Every import in ``modules`` that points up a wing, or is relative."""
    wrong = []
    for name, path in modules.items():
        wing = _wing(name)
        for line, target in _imports(path):
            if target.startswith("."):
                wrong.append(f"{path}:{line}: a relative import ({target})")
                continue
            if not target.startswith("batchgen.") or target not in MODULES or wing == "batchgen":
                continue
            other = _wing(target)
            if other != wing and FLOORS[other] > FLOORS[wing]:
                wrong.append(f"{path}:{line}: {wing} imports {target} ({other} is above it)")
    return wrong


def _batchgen_edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for name, path in MODULES.items():
        for _, target in _imports(path):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def test_every_module_belongs_to_a_wing():
    assert {_wing(m) for m in MODULES} - {"batchgen"} <= set(FLOORS)


def test_imports_point_down_or_within_their_wing():
    wrong = _upward(MODULES)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = _batchgen_edges()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path
                              else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("wing", sorted(FORBIDDEN))
def test_wings_keep_away_from_what_is_not_theirs(wing):
    wrong = []
    for name, path in MODULES.items():
        if _wing(name) != wing:
            continue
        for line, target in _imports(path):
            if target.split(".")[0] in FORBIDDEN[wing]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_rule_catches_an_import_that_points_up(tmp_path):
    # The rule must be able to fail: a spec module importing the engine lazily, and a relative
    # import, are both caught.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from batchgen.engine.engine import Engine\n"
                   "    from . import load\n")
    wrong = _upward({"batchgen.spec.bad": bad})
    assert wrong == [f"{bad}:2: spec imports batchgen.engine.engine (engine is above it)",
                     f"{bad}:3: a relative import (.)"]
