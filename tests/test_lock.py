"""One driver per output: the create-only lock, its heartbeat and stale takeover."""

import json
import socket
import threading
import time

import pytest

from batchgen.lock import LOCK, JobLock, LockHeld
from batchgen.storage import Storage, storage_options


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def out(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    if request.param == "moto":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    else:
        weed = request.getfixturevalue("seaweed")
        endpoint, bucket = weed.endpoint, weed.bucket()
    url = f"{bucket}/out"
    return Storage(url, storage_options(url, endpoint))


def test_create_only_write_refuses_an_existing_object(out):
    assert out.create_bytes("x.json", b"1") is True
    assert out.create_bytes("x.json", b"2") is False
    assert out.read_bytes("x.json") == b"1"


def test_second_holder_is_refused_with_the_holder_named(out):
    first = JobLock(out)
    first.acquire()
    try:
        with pytest.raises(LockHeld) as e:
            JobLock(out).acquire()
        assert f"in use by another driver: pid {__import__('os').getpid()} on {socket.gethostname()}" in str(e.value)
    finally:
        first.release()
    assert not out.exists(LOCK)
    with JobLock(out):  # free again
        assert out.exists(LOCK)


def test_of_many_racing_drivers_exactly_one_wins(out):
    locks = [JobLock(out) for _ in range(8)]
    won, barrier = [], threading.Barrier(len(locks))

    def race(lock):
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            pass

    threads = [threading.Thread(target=race, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


def test_stale_locks_are_taken_over(out):
    # No heartbeat for longer than its TTL, from another machine.
    out.write_json(LOCK, {"holder": "old", "host": "elsewhere", "pid": 1,
                          "heartbeat_at": time.time() - 600, "ttl_s": 60})
    with JobLock(out) as lock:
        assert json.loads(out.read_bytes(LOCK))["holder"] == lock.holder
    # A fresh heartbeat, but from a process on this host that no longer exists (killed -9).
    out.write_json(LOCK, {"holder": "dead", "host": socket.gethostname(), "pid": 2**22 + 12345,
                          "heartbeat_at": time.time(), "ttl_s": 60})
    with JobLock(out) as lock:
        assert json.loads(out.read_bytes(LOCK))["holder"] == lock.holder
    # Live and elsewhere: refused.
    out.write_json(LOCK, {"holder": "live", "host": "elsewhere", "pid": 7,
                          "heartbeat_at": time.time(), "ttl_s": 60})
    with pytest.raises(LockHeld, match="pid 7 on elsewhere"):
        JobLock(out).acquire()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    out = Storage(str(tmp_path / "out"))
    lock = JobLock(out, beat_s=0.1)
    lock.acquire()
    first = json.loads(out.read_bytes(LOCK))["heartbeat_at"]
    deadline = time.monotonic() + 5
    while json.loads(out.read_bytes(LOCK))["heartbeat_at"] == first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)
    out.write_json(LOCK, {"holder": "usurper", "host": "elsewhere", "pid": 9,
                          "heartbeat_at": time.time(), "ttl_s": 60})
    deadline = time.monotonic() + 5
    while lock.lost is None:
        assert time.monotonic() < deadline, "takeover not noticed"
        time.sleep(0.05)
    assert "pid 9 on elsewhere" in lock.lost
    lock.release()
    assert json.loads(out.read_bytes(LOCK))["holder"] == "usurper"  # not ours to remove
