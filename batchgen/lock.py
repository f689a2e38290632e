"""One driver per output: a create-only lock object refreshed as a heartbeat.

``_batchgen/lock.json`` is created with a create-only write (a conditional PUT on S3), so of two
drivers starting together exactly one gets it. The holder rewrites it every ``beat_s`` seconds. A
second driver is refused, with the holder named, unless the lock is stale: no heartbeat for
``ttl_s`` seconds, or held by a process on this host that no longer exists (a driver killed with
SIGKILL leaves its lock behind, and its resume should not have to wait out the TTL).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from batchgen.errors import BatchgenError
from batchgen.storage import Storage

LOCK = "_batchgen/lock.json"
TTL_S = 60.0
BEAT_S = 10.0


class LockHeld(BatchgenError):
    """Another driver holds the output."""


class JobLock:
    def __init__(self, out: Storage, *, ttl_s: float = TTL_S, beat_s: float = BEAT_S):
        self.out = out
        self.ttl_s = ttl_s
        self.beat_s = beat_s
        self.holder = uuid.uuid4().hex
        self.lost: str | None = None  # set when another driver took the lock from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    # -- public ----------------------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(3):
            if self.out.create_bytes(LOCK, self._doc()):
                self._start_heartbeat()
                return
            held = self._read()
            if held is None:
                continue  # released between our create and our read: try again
            reason = stale_reason(held, self.ttl_s)
            if reason is None:
                raise LockHeld(
                    f"output {self.out.url} is in use by another driver: {describe(held)}. "
                    f"Wait for it to end or stop it; a lock with no heartbeat for {self.ttl_s:g} s "
                    f"is taken over ({self.out.url_of(LOCK)})"
                )
            self.out.remove(LOCK)  # stale: take it over through the same create-only write
        raise LockHeld(f"output {self.out.url}: another driver keeps taking the lock; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. A storage error here is
        swallowed: it must not mask the job's own outcome, and the lock goes stale anyway."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held is not None and held.get("holder") == self.holder:
                self.out.remove(LOCK)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------------

    def _doc(self) -> bytes:
        doc = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _iso(self._started),
            "heartbeat_at": time.time(),
            "ttl_s": self.ttl_s,
        }
        return json.dumps(doc, indent=2).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.out.read_bytes(LOCK))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treated as stale below (no heartbeat)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="batchgen-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                held = self._read()
                if held is not None and held.get("holder") not in (None, self.holder):
                    self.lost = f"the lock was taken over by {describe(held)}"
                    return
                self.out.write_bytes(LOCK, self._doc())
            except Exception:  # noqa: BLE001 - a missed beat is retried; storage may be down
                continue


def stale_reason(held: dict[str, Any], ttl_s: float) -> str | None:
    """Why a lock document no longer protects anything, or None if it is live."""
    beat = held.get("heartbeat_at")
    if not isinstance(beat, (int, float)):
        return "it has no heartbeat"
    age = time.time() - beat
    if age > max(ttl_s, float(held.get("ttl_s") or 0)):
        return f"no heartbeat for {age:.0f} s"
    if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
        return f"its process {held.get('pid')} on this host is gone"
    return None


def describe(held: dict[str, Any]) -> str:
    beat = held.get("heartbeat_at")
    age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (
        f"pid {held.get('pid')} on {held.get('host')}, started {held.get('started_at')}, "
        f"last heartbeat {age}"
    )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
