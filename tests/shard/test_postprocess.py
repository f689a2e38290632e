"""Checking model output against a JSON Schema: bounded however the schema's patterns backtrack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchgen.shard import postprocess
from batchgen.shard.postprocess import parse_generation, parse_json
from batchgen.shard.responses import parse_tool_calls

BACKTRACKS = "^(a|aa|aaa)*$"  # against a run of a's and one other character: hours of search


@pytest.fixture(autouse=True)
def short_budget(monkeypatch):
    # The budget only has to be far beyond a real check (microseconds) and far below the search
    # of a backtracking pattern (hours); the default (2 s) is too, but slower to wait for.
    monkeypatch.setattr(postprocess, "CHECK_SECONDS", 0.25)


def test_the_issue_case_finishes_in_a_fresh_process():
    # `pattern: ^(a|aa)*b$` against 56 a's hung a one-row job in post-generation validation
    # (Python's re). The regex engine the check now uses answers this one at once; patterns it
    # cannot answer at once are stopped by the budget (the tests below).
    code = ("from batchgen.shard.postprocess import parse_json; "
            "print(parse_json('{\"s\": \"' + 'a' * 56 + '\"}', {'properties': {'s': "
            "{'pattern': '^(a|aa)*b$'}}})[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"schema: s: '{'a' * 56}' does not match '^(a|aa)*b$'"


@pytest.mark.parametrize("schema, value", [
    ({"properties": {"s": {"pattern": BACKTRACKS}}}, {"s": "a" * 60 + "!"}),
    ({"patternProperties": {BACKTRACKS: {}}, "additionalProperties": False}, {"a" * 60 + "!": 1}),
    ({"patternProperties": {BACKTRACKS: {}}, "unevaluatedProperties": False}, {"a" * 60 + "!": 1}),
], ids=["pattern", "additionalProperties", "unevaluatedProperties"])
def test_a_pattern_that_backtracks_is_stopped_and_named(schema, value):
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", **schema}
    parsed, error = parse_json(json.dumps(value), schema)
    assert parsed is None
    assert error == (f"schema: (check): stopped after 0.25 s in the pattern {BACKTRACKS!r}, which "
                     "backtracks on this text; write it so that it cannot (no nested or "
                     "overlapping repeats like (a|aa)*)")
    # output.parse: json takes the same check.
    assert parse_generation(json.dumps(value), schema)[1] == error


def test_patterns_that_do_not_backtrack_check_as_before():
    schema = {"type": "object", "properties": {"code": {"pattern": "^[A-Z]{3}-[0-9]+$"}},
              "patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}
    assert parse_json('{"code": "ABC-12", "x-a": 3}', schema) == ('{"code":"ABC-12","x-a":3}', None)
    assert parse_json('{"code": "abc"}', schema)[1] == (
        "schema: code: 'abc' does not match '^[A-Z]{3}-[0-9]+$'")
    assert parse_json('{"y": 1}', schema)[1].startswith("schema: (root): 'y' does not match any")


def test_tool_arguments_are_checked_under_the_same_bound():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": BACKTRACKS}}}}}]
    calls, error = parse_tool_calls(json.dumps({"name": "f", "arguments": {"q": "a" * 60 + "!"}}),
                                    tools)
    assert calls is None and error.startswith("tool call 1 (f): arguments do not match the "
                                              "tool's parameters: (check): stopped after 0.25 s")
