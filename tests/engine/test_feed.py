"""The decoder fed across calls: ``SlotDecoder``'s incremental API and ``feed.EngineFeed``.

What a user would notice: a row's text changing because another shard's rows shared its batch
(checked bitwise on the logits, as in ``test_slots``), a shard's rows mixed up with another's, a
failure that behaves differently with the feed, or no gain (the decoder still drains per call).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from test_slots import (  # noqa: F401 - fixtures: tiny, one_thread (autouse)
    MIXED_TEXTS, SAMPLED, TOPICS, Recorder, assert_bitwise, chat, one_thread, tiny, tiny_engine,
    tiny_requests
)

from batchgen.engine import Request
from batchgen.engine.backoff import NonFiniteLogits
from batchgen.engine.decoder import SlotDecoder
from batchgen.spec.constraints import constraint_for

REGEX = r"[0-9]{3}-[a-z]{2,4}"


def regex_constraint():
    return constraint_for(SimpleNamespace(
        json_schema=None, json_object=False, regex=REGEX, choice=None, grammar=None,
        json_schema_column=None, tool_call=False))


def shards(tok, count=4, rows=10):
    """``count`` shards of chat and plain prompts (rows of many lengths), unique seeds."""
    out = []
    for k in range(count):
        texts = [chat(TOPICS[(k + i) % len(TOPICS)], "Be brief." * (i % 3)) if i % 3 else
                 "The river follows the bright moon. " * (1 + (i + k) % 4) for i in range(rows)]
        out.append(tiny_requests(tok, texts, seed=1000 * (k + 1)))
    return out


def same(got, want) -> None:
    assert [(c.text, c.finish_reason, c.token_ids, c.error, c.truncated) for c in got] == [
        (c.text, c.finish_reason, c.token_ids, c.error, c.truncated) for c in want]


# -- the decoder, one turn at a time --------------------------------------------------------------


def test_requests_added_while_the_loop_runs_equal_one_run(monkeypatch, tiny):
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=4, **SAMPLED)
    requests = tiny_requests(tok, MIXED_TEXTS)
    prompt = requests[1].prompt_ids
    requests += [Request(prompt, 500 + s) for s in range(3)]  # samples of one prompt: forked
    rec = Recorder(monkeypatch)
    want, want_logits = rec.run(eng, requests)

    # The longest prompts first: the later pieces fit the cache the first one holds.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
    pieces = [order[:4], order[4:9], order[9:]]
    dec = eng._slot_decoder(eng.gen, eng.eos_ids, eng._prefix, eng._prefix_kv, eng._state)
    dec.open()
    where, got, added_busy, turns = {}, {}, [], 0
    rec.logits, rec.on = {}, True
    try:
        while pieces or dec.busy:
            if pieces and turns % 3 == 0:
                piece = pieces.pop(0)
                added_busy.append(dec.busy)
                assert dec.fits([requests[i] for i in piece])
                offset = dec.add([requests[i] for i in piece])
                where.update({offset + j: i for j, i in enumerate(piece)})
            for index, result in dec.advance():
                got[where[index]] = result
            turns += 1
    finally:
        rec.on = False
    assert added_busy == [False, True, True]  # pieces 2 and 3 joined a running loop
    assert [got[i][0] for i in range(len(requests))] == [c.token_ids for c in want]
    assert_bitwise(rec.logits, want_logits, "added in three pieces")
    assert len(rec.logits) == len(want_logits)

    # A prompt longer than the live rows' cache waits for an idle decoder.
    dec.add(requests[:1])
    dec.advance()
    long = Request(tuple(tok("The cat sees the moon. " * 40)["input_ids"]), 9)
    assert dec.busy and not dec.fits([long])
    with pytest.raises(ValueError, match="larger slot cache"):
        dec.add([long])


# -- the feed: two threads, interleaved shards ----------------------------------------------------


def test_shards_from_two_threads_equal_classic_generate(monkeypatch, tiny):
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8, **SAMPLED)
    work = shards(tok)
    constraint = regex_constraint()  # one shard constrained: masks for its rows only
    work[2] = [Request(r.prompt_ids, r.seed, constraint) for r in work[2]]
    rec = Recorder(monkeypatch)
    want, want_logits = [], {}
    for shard in work:
        out, logits = rec.run(eng, shard)
        want.append(out)
        want_logits.update(logits)
    assert all(c.text and c.text[:3].isdigit() for c in want[2])  # the regex held

    feed = eng.feed()
    assert eng.feed() is feed
    got, errors = {}, []

    def replica_thread(ks):
        try:
            for k in ks:
                got[k] = feed.generate(work[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    rec.logits, rec.on = {}, True
    threads = [threading.Thread(target=replica_thread, args=(ks,)) for ks in ([0, 2], [1, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    rec.on = False
    assert not errors and sorted(got) == [0, 1, 2, 3]
    for k in range(4):
        same(got[k], want[k])
    # The steps whose tokens are output: a stopped row runs one step past its end when tokens
    # are read one step late, not while a constrained shard's rows make the loop read at once.
    kept = {r.seed: c.generated_tokens
            for shard, out in zip(work, want) for r, c in zip(shard, out)}
    assert_bitwise(rec.logits, {k: v for k, v in want_logits.items() if k[1] < kept[k[0]]},
                   "through the feed from two threads")
    deadline = time.monotonic() + 10
    while feed._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feed._thread is None  # no work left: the thread is gone


def test_the_feed_keeps_the_batch_full_across_calls(tiny):
    """Two calls through the feed: the second's rows take the slots the first's free, instead
    of the first draining alone. Fewer decode steps for the same tokens."""
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8, **SAMPLED)
    a, b = shards(tok, count=2, rows=12)
    steps = eng.stats.decode_steps
    want = eng.generate(a) + eng.generate(b)
    classic = eng.stats.decode_steps - steps

    feed = eng.feed()
    steps, batches = eng.stats.decode_steps, eng.stats.batches
    first, second = feed.submit(a), feed.submit(b)
    got = first.result() + second.result()
    fed = eng.stats.decode_steps - steps
    same(got, want)
    assert eng.stats.batches - batches == 2
    assert fed < classic, (fed, classic)


def test_a_submission_needing_a_larger_cache_waits_for_an_idle_loop(monkeypatch, tiny):
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8, **SAMPLED)
    a = shards(tok, count=1)[0]
    b = tiny_requests(tok, ["The old town remembers the long road before the rain. " * 12,
                            chat("tea")], seed=7000)
    want_a, want_b = eng.generate(a), eng.generate(b)
    eng._state.clear()  # a cache sized for a's prompts only, as a replica's first shard makes
    fits, answers = SlotDecoder.fits, []
    monkeypatch.setattr(SlotDecoder, "fits", lambda self, r: answers.append(fits(self, r))
                        or answers[-1])
    feed = eng.feed()
    first, second = feed.submit(a), feed.submit(b)
    same(first.result(), want_a)
    same(second.result(), want_b)
    assert False in answers  # b waited while a's rows were live
    assert eng._state["slots"].cache.capacity >= len(b[0].prompt_ids) + 16


# -- failures: the loop raises, each submission re-runs through classic generate -----------------


def test_a_failing_loop_falls_back_to_classic_generate(monkeypatch, tiny):
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8, **SAMPLED)
    a, b = shards(tok, count=2)
    want_a, want_b = eng.generate(a), eng.generate(b)
    read = SlotDecoder._read
    failures = []

    def read_once_bad(self, rows, host):
        if not failures:
            failures.append(len(rows))
            raise NonFiniteLogits("the model produced NaN/inf logits")
        return read(self, rows, host)

    monkeypatch.setattr(SlotDecoder, "_read", read_once_bad)
    feed = eng.feed()
    first, second = feed.submit(a), feed.submit(b)
    same(first.result(), want_a)
    same(second.result(), want_b)
    assert failures and eng.stats.splits == 0  # one failure, cured by running again
    same(feed.generate(b), want_b)  # the feed goes on after it


def test_a_row_that_always_fails_is_an_error_row_as_without_the_feed(monkeypatch, tiny):
    """Back-off as in classic generate: the failing submission is split down to the bad row,
    which becomes an error completion; the other submission is untouched."""
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8, **SAMPLED)
    a, b = shards(tok, count=2)
    bad = a[3].seed
    read = SlotDecoder._read

    def read_bad_row(self, rows, host):
        if any(self.requests[r.index].seed == bad for r in rows):
            raise NonFiniteLogits("the model produced NaN/inf logits")
        return read(self, rows, host)

    monkeypatch.setattr(SlotDecoder, "_read", read_bad_row)
    want_a, want_b = eng.generate(a), eng.generate(b)
    splits = eng.stats.splits
    assert want_a[3].finish_reason == "error" and splits > 0
    feed = eng.feed()
    first, second = feed.submit(a), feed.submit(b)
    same(first.result(), want_a)
    same(second.result(), want_b)
    assert eng.stats.splits == 2 * splits  # a's back-off ran again, b's needed none


def test_an_error_that_is_not_a_back_off_goes_to_its_caller(monkeypatch, tiny):
    tok = tiny[1]
    eng = tiny_engine(tiny, batch_size=8)
    a, b = shards(tok, count=2)
    want_b = eng.generate(b)
    read = SlotDecoder._read
    bad = a[0].seed

    def read_broken(self, rows, host):
        if any(self.requests[r.index].seed == bad for r in rows):
            raise KeyError("a bug")
        return read(self, rows, host)

    monkeypatch.setattr(SlotDecoder, "_read", read_broken)
    feed = eng.feed()
    first, second = feed.submit(a), feed.submit(b)
    with pytest.raises(KeyError, match="a bug"):
        first.result()
    same(second.result(), want_b)
