"""SIGTERM and Ctrl-C as a clean stop, held back while a commit is half done.

A stop arriving outside a commit raises ``KeyboardInterrupt`` at once; inside one it is held until
the commit (publish, marker, cleanup) is whole, so a stop never leaves a data file without its
done marker. One ``Interrupts`` per run: a signal held by one job must not stop the next job run
in the same process (tests, notebooks).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Interrupts:
    def __init__(self) -> None:
        self.deferring = False
        self.pending = False

    def handler(self, signum, frame) -> None:
        if self.deferring:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            pending, self.pending = self.pending, False
        if pending:  # reached only when the commit itself did not raise
            raise KeyboardInterrupt

    def install(self) -> Callable[[], None]:
        """Route SIGTERM (Ray job stop, schedulers, kill) and SIGINT here; returns a function
        that restores the handlers from before. Off the main thread signals cannot be handled,
        and this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self.handler) for sig in _SIGNALS}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def reclaim(self) -> None:
        """Take the signals back after a library set its own handlers: ``ray.init`` installs a
        SIGTERM handler that exits the process (status 15, no cancelled status, lock kept)."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                signal.signal(sig, self.handler)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
