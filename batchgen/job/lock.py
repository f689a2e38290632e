"""One driver per output: numbered lock documents, one per holder, refreshed as a heartbeat.

Each holder gets an epoch ``E`` and its own document ``_batchgen/lock/<E>.json``, created with a
create-only write (a conditional PUT on S3, a hard link locally). Taking over from the holder of
``E`` means creating ``E + 1``, so of many drivers that judged ``E`` stale at once exactly one
wins — and nobody ever deletes another holder's document, which is what let several takers win
when a takeover meant "delete the stale lock, then create": a second taker deleted the first
taker's fresh lock. Only the holder writes its own document (heartbeats, and ``released`` at the
end), so no write races another.

The lock is held while the newest document is ours and not released. ``check()`` asks exactly
that, with one listing; the driver calls it before every commit and before clearing staging, so a
driver that was taken over (paused past the TTL, judged dead) stops before it writes anything.

A document is stale when it is released, has had no heartbeat for ``ttl_s`` seconds, or belongs
to a process that is gone: same host, same boot and same pid namespace, and that pid no longer
exists (a driver killed with SIGKILL; its resume need not wait out the TTL). Containers that
share a hostname but not a pid namespace (host networking) never take that shortcut.

Drivers of earlier batchgen versions know only ``_batchgen/lock.json``: the holder keeps a copy
of its document there too (written at every heartbeat, removed when it releases), so they see a
live lock and refuse, and a live ``lock.json`` of theirs is respected here.
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
from batchgen.io import layout
from batchgen.io.storage import Storage

TTL_S = 60.0
BEAT_S = 10.0
_WIDTH = 12  # epochs zero-padded, so names sort as numbers


class LockHeld(BatchgenError):
    """Another driver holds the output."""


class LockLost(BatchgenError):
    """This driver no longer holds the output: another took it over."""


def epoch_path(epoch: int) -> str:
    return f"{layout.LOCK_DIR}/{epoch:0{_WIDTH}d}.json"


class JobLock:
    def __init__(self, out: Storage, *, ttl_s: float = TTL_S, beat_s: float = BEAT_S):
        self.out = out
        self.ttl_s = ttl_s
        self.beat_s = beat_s
        self.holder = uuid.uuid4().hex
        self.epoch: int | None = None
        self.lost: str | None = None  # set when another driver took the lock from us
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat never lands after the release
        self._thread: threading.Thread | None = None
        self._started = time.time()

    # -- public ----------------------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(10):
            newest = self._newest()
            if newest is not None:
                epoch, held = newest
                reason = stale_reason(held, self.ttl_s)
                if reason is None:
                    raise LockHeld(
                        f"output {self.out.url} is in use by another driver: {describe(held)}. "
                        f"Wait for it to end or stop it; a lock with no heartbeat for "
                        f"{self.ttl_s:g} s is taken over ({self.out.url_of(epoch_path(epoch))})"
                    )
            else:
                epoch = 0
            self._refuse_live_legacy_lock()
            # Only one caller can create the successor of the document it judged stale.
            if self.out.create_bytes(epoch_path(epoch + 1), self._doc(epoch + 1)):
                self.epoch = epoch + 1
                self._forget_older()
                self.out.write_bytes(layout.LEGACY_LOCK, self._doc(self.epoch))
                self._start_heartbeat()
                return
        raise LockHeld(f"output {self.out.url}: other drivers keep taking the lock; try again")

    def check(self) -> None:
        """Raise LockLost unless this driver still holds the lock (one listing)."""
        if self.lost:
            raise LockLost(f"stopping: {self.lost}")
        newest = self._newest()
        if newest is None or newest[0] != self.epoch or newest[1].get("holder") != self.holder:
            self.lost = ("the lock was taken over by "
                         f"{describe(newest[1]) if newest else 'nobody (it was removed)'}")
            raise LockLost(f"stopping: {self.lost}")

    def release(self) -> None:
        """Stop the heartbeat and mark our document released, if it is still the newest. A
        storage error here is swallowed: it must not mask the job's own outcome, and the lock
        goes stale anyway."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.epoch is None:
            return
        try:
            with self._writing:
                self.check()
                self.out.write_bytes(epoch_path(self.epoch), self._doc(self.epoch, released=True))
                legacy = json.loads(self.out.read_bytes(layout.LEGACY_LOCK))
                if legacy.get("holder") == self.holder:
                    self.out.remove(layout.LEGACY_LOCK)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------------

    def _doc(self, epoch: int, released: bool = False) -> bytes:
        doc = {
            "holder": self.holder,
            "epoch": epoch,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid_ns": _pid_namespace(),
            "pid": os.getpid(),
            "started_at": _iso(self._started),
            "heartbeat_at": time.time(),
            "ttl_s": self.ttl_s,
        }
        if released:
            doc["released_at"] = time.time()
        return json.dumps(doc, indent=2).encode()

    def _newest(self) -> tuple[int, dict[str, Any]] | None:
        """(epoch, document) of the newest lock document, or None if there is none. Nobody
        deletes the newest document, only older ones; so if the newest listed is gone, a newer
        one appeared since the listing, and we list again."""
        for _ in range(100):
            epochs = [int(n.removesuffix(".json")) for n in self.out.list_names(layout.LOCK_DIR)
                      if n.removesuffix(".json").isdigit()]
            if not epochs:
                return None
            epoch = max(epochs)
            try:
                return epoch, json.loads(self.out.read_bytes(epoch_path(epoch)))
            except FileNotFoundError:
                continue
            except ValueError:
                return epoch, {}  # unreadable: treated as stale (no heartbeat)
        raise LockHeld(f"output {self.out.url}: the lock keeps changing; try again")

    def _refuse_live_legacy_lock(self) -> None:
        """A driver of an earlier batchgen version holds ``_batchgen/lock.json``."""
        try:
            held = json.loads(self.out.read_bytes(layout.LEGACY_LOCK))
        except (FileNotFoundError, ValueError):
            return
        if stale_reason(held, self.ttl_s) is None:
            raise LockHeld(f"output {self.out.url} is in use by another driver (an earlier "
                           f"batchgen version): {describe(held)}")

    def _forget_older(self) -> None:
        for name in self.out.list_names(layout.LOCK_DIR):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) < (self.epoch or 0):
                self.out.remove(f"{layout.LOCK_DIR}/{name}")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="batchgen-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                with self._writing:
                    if self._stop.is_set():
                        return
                    self.check()
                    doc = self._doc(self.epoch)
                    self.out.write_bytes(epoch_path(self.epoch), doc)
                    self.out.write_bytes(layout.LEGACY_LOCK, doc)
            except LockLost:
                return
            except Exception:  # noqa: BLE001 - a missed beat is retried; storage may be down
                continue


def stale_reason(held: dict[str, Any], ttl_s: float) -> str | None:
    """Why a lock document no longer protects anything, or None if it is live."""
    if held.get("released_at"):
        return "it was released"
    beat = held.get("heartbeat_at")
    if not isinstance(beat, (int, float)):
        return "it has no heartbeat"
    age = time.time() - beat
    if age > max(ttl_s, float(held.get("ttl_s") or 0)):
        return f"no heartbeat for {age:.0f} s"
    if _same_process_space(held) and not _alive(held.get("pid")):
        return f"its process {held.get('pid')} on this host is gone"
    return None


def _same_process_space(held: dict[str, Any]) -> bool:
    """Whether a pid in ``held`` names a process we can see: same host, same boot, same pid
    namespace. A document without boot id or namespace (older versions) never qualifies."""
    return (held.get("host") == socket.gethostname() and held.get("boot_id") is not None
            and held.get("boot_id") == _boot_id() and held.get("pid_ns") is not None
            and held.get("pid_ns") == _pid_namespace())


def describe(held: dict[str, Any]) -> str:
    beat = held.get("heartbeat_at")
    age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (
        f"pid {held.get('pid')} on {held.get('host')}, started {held.get('started_at')}, "
        f"last heartbeat {age}"
    )


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


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
