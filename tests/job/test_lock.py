"""One driver per output: the create-only lock, its heartbeat and stale takeover."""

import json
import socket
import threading
import time

import pytest

from batchgen.io import layout
from batchgen.io.storage import Storage, storage_options
from batchgen.job.lock import JobLock, LockHeld, LockLost, epoch_path


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.s3),
                        pytest.param("seaweedfs", marks=pytest.mark.s3)])
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


def newest(out: Storage) -> dict | None:
    names = sorted(n for n in out.list_names(layout.LOCK_DIR) if n.endswith(".json"))  # not temps
    return json.loads(out.read_bytes(f"{layout.LOCK_DIR}/{names[-1]}")) if names else None


def plant(out: Storage, epoch: int = 1, **doc) -> None:
    """A lock document left by some other driver."""
    out.write_json(epoch_path(epoch), {"epoch": epoch, "ttl_s": 60, **doc})


def race(locks: list[JobLock]) -> list[JobLock]:
    """Every lock tries to acquire at the same instant, each on its own thread; the winners."""
    won, barrier = [], threading.Barrier(len(locks))

    def one(lock):
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            pass

    threads = [threading.Thread(target=one, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


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
    assert newest(out)["released_at"]
    with JobLock(out) as again:  # free again
        assert newest(out)["holder"] == again.holder and again.epoch == 2
    assert out.list_names(layout.LOCK_DIR) == [f"{2:012d}.json"]  # older documents cleaned up


def test_of_many_racing_drivers_exactly_one_wins(out):
    won = race([JobLock(out) for _ in range(8)])
    assert len(won) == 1
    won[0].release()


def test_stale_locks_are_taken_over(out):
    # No heartbeat for longer than its TTL, from another machine.
    plant(out, 1, holder="old", host="elsewhere", pid=1, heartbeat_at=time.time() - 600)
    with JobLock(out) as lock:
        assert newest(out)["holder"] == lock.holder and lock.epoch == 2
    # A fresh heartbeat, but from a process on this host that no longer exists (killed -9).
    me = json.loads(JobLock(out)._doc(0))
    plant(out, 3, holder="dead", host=me["host"], boot_id=me["boot_id"], pid_ns=me["pid_ns"],
          pid=2**22 + 12345, heartbeat_at=time.time())
    with JobLock(out) as lock:
        assert newest(out)["holder"] == lock.holder and lock.epoch == 4
    # Live and elsewhere: refused.
    plant(out, 5, holder="live", host="elsewhere", pid=7, heartbeat_at=time.time())
    with pytest.raises(LockHeld, match="pid 7 on elsewhere"):
        JobLock(out).acquire()


def test_a_dead_pid_in_another_pid_namespace_is_not_a_dead_driver(tmp_path):
    """Containers sharing a hostname (host networking) but not a pid namespace: the pid says
    nothing about the other container's driver, so only the heartbeat counts."""
    out = Storage(str(tmp_path / "out"))
    me = json.loads(JobLock(out)._doc(0))
    for other in ({"pid_ns": "pid:[4026530000]", "boot_id": me["boot_id"]},
                  {"pid_ns": me["pid_ns"], "boot_id": "another-boot"},
                  {}):  # written by an earlier version: no namespace recorded
        plant(out, 1, holder="other", host=me["host"], pid=2**22 + 12345,
              heartbeat_at=time.time(), **other)
        with pytest.raises(LockHeld):
            JobLock(out).acquire()


def test_a_legacy_lock_of_a_live_driver_is_respected(tmp_path):
    out = Storage(str(tmp_path / "out"))
    out.write_json(layout.LEGACY_LOCK, {"holder": "v1", "host": "elsewhere", "pid": 3,
                                        "heartbeat_at": time.time(), "ttl_s": 60})
    with pytest.raises(LockHeld, match="earlier batchgen version"):
        JobLock(out).acquire()
    out.write_json(layout.LEGACY_LOCK, {"holder": "v1", "host": "elsewhere", "pid": 3,
                                        "heartbeat_at": time.time() - 600, "ttl_s": 60})
    with JobLock(out) as lock:  # stale: taken, and our document stands there for old drivers
        assert json.loads(out.read_bytes(layout.LEGACY_LOCK))["holder"] == lock.holder
    assert not out.exists(layout.LEGACY_LOCK)


def test_racing_takeovers_of_one_stale_lock_have_one_winner(out):
    """8 drivers judge the same lock stale at the same instant, 20 times over: exactly one
    takes it each time, and every other is refused or finds out before it commits."""
    trials = 20 if out.is_local else 5
    for trial in range(trials):
        plant(out, 1 + trial * 10, holder=f"stale-{trial}", host="elsewhere", pid=1,
              heartbeat_at=time.time() - 600)
        locks = [JobLock(out, beat_s=3600) for _ in range(8)]
        won = race(locks)
        still_holding = []
        for lk in won:
            try:
                lk.check()  # what the driver does before every commit
                still_holding.append(lk)
            except LockLost:
                pass
        assert len(still_holding) == 1, f"trial {trial}: {len(still_holding)} holders"
        assert len(won) == 1, f"trial {trial}: {len(won)} winners"
        for lk in won:
            lk.release()
        for name in out.list_names(layout.LOCK_DIR):
            out.remove(f"{layout.LOCK_DIR}/{name}")


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    out = Storage(str(tmp_path / "out"))
    lock = JobLock(out, beat_s=0.1)
    lock.acquire()
    first = newest(out)["heartbeat_at"]
    deadline = time.monotonic() + 30
    while newest(out)["heartbeat_at"] == first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)
    plant(out, lock.epoch + 1, holder="usurper", host="elsewhere", pid=9, heartbeat_at=time.time())
    deadline = time.monotonic() + 30
    while lock.lost is None:
        assert time.monotonic() < deadline, "takeover not noticed"
        time.sleep(0.05)
    assert "pid 9 on elsewhere" in lock.lost
    with pytest.raises(LockLost):
        lock.check()
    lock.release()
    assert newest(out)["holder"] == "usurper" and "released_at" not in newest(out)  # not ours
