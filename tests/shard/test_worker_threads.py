"""Two shards at once on one worker (the replica holds two): the same files as one at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
import torch
from conftest import prompt_table, spec_dict

from batchgen.job.plan import make_plan
from batchgen.shard.worker import ShardWorker
from batchgen.spec.load import parse_spec


@pytest.fixture(autouse=True)
def torch_threads():
    """Loading the engine sets torch's threads (resources.cpus_per_replica: 1); put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Exclusive:
    """Wraps a method: counts calls, fails if two threads are ever inside it at once."""

    def __init__(self, monkeypatch, owner, name, inside):
        self.inside, self.calls, original = inside, 0, getattr(owner, name)

        def wrapped(*args, **kwargs):
            with self.inside["lock"]:
                self.inside["now"] += 1
                self.inside["most"] = max(self.inside["most"], self.inside["now"])
                self.calls += 1
            try:
                return original(*args, **kwargs)
            finally:
                with self.inside["lock"]:
                    self.inside["now"] -= 1

        monkeypatch.setattr(owner, name, wrapped)


def test_two_threads_write_the_files_one_at_a_time_writes(tmp_path, tiny_model, monkeypatch):
    pq.write_table(prompt_table(40), tmp_path / "in.parquet")
    spec = parse_spec(spec_dict(
        str(tmp_path / "in.parquet"), str(tmp_path / "out"), tiny_model,
        input={"prompt_column": None, "template": "The {{ topic }} and the"},
        generation={"n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 11, "max_new_tokens": 24},
        resources={"shard_rows": 8, "batch_size": 8, "cpus_per_replica": 1}))
    shards = make_plan(spec).shards
    assert len(shards) == 5
    worker = ShardWorker(spec)
    assert worker.feed is not None  # the tiny model is on the slot path
    stats = worker.engine.stats

    steps = stats.decode_steps
    alone = [worker.run(s, "alone") for s in shards]
    steps_alone = stats.decode_steps - steps

    # Host work (tokenizing, writing) from two threads must never overlap.
    inside = {"lock": threading.Lock(), "now": 0, "most": 0}
    tokenize = Exclusive(monkeypatch, worker.engine, "tokenize", inside)
    write = Exclusive(monkeypatch, worker, "_write_staged", inside)
    steps = stats.decode_steps
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda s: worker.run(s, "both"), shards))
    steps_both = stats.decode_steps - steps

    out = tmp_path / "out"
    for a, b in zip(alone, both):
        assert a.staged != b.staged
        assert pq.read_table(out / a.staged).equals(pq.read_table(out / b.staged)), a.shard_id
        assert (a.rows, a.outputs, a.generated_tokens) == (b.rows, b.outputs, b.generated_tokens)
        assert 0 < b.engine_seconds <= b.seconds
    assert tokenize.calls >= 5 and write.calls == 5 and inside["most"] == 1
    # The shards shared the decoder: the next one's rows filled the slots as one drained.
    assert steps_both < steps_alone, (steps_both, steps_alone)
