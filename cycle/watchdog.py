"""Nothing waits forever: a stage that makes no progress for `timeout_s` says why and stops.

A Ray Train worker group or a Ray Data actor pool that cannot get its CPUs or GPUs waits without
an error (Train retries its placement group, Data backpressures). The stage calls `beat()`
whenever it moves; a daemon thread checks the time since the last beat and, past the timeout,
prints what the stage asks for and what the cluster has, then ends the process: a blocked
`fit()` or Data iterator cannot be interrupted from another thread, and a rerun with --resume
keeps every finished stage.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from cycle.console import log, pass_on_what_is_left

STALL_EXIT_CODE = 3


def _exit_stalled(message: str) -> None:
    sys.stdout.flush()
    log(f"error: {message}")
    pass_on_what_is_left()
    os._exit(STALL_EXIT_CODE)


class Watchdog:
    """`with Watchdog("cycle 1 shards", 600, describe) as dog: ... dog.beat() ...`.
    `describe(waited_s)` returns the message; `stalled(waited_s)` may veto (e.g. every trainer is
    already running, so a long epoch is not a stall); `on_stall` defaults to ending the process."""

    def __init__(
        self,
        what: str,
        timeout_s: float,
        describe: Callable[[float], str],
        stalled: Callable[[], bool] = lambda: True,
        on_stall: Callable[[str], None] = _exit_stalled,
        poll_s: float = 1.0,
    ):
        self.what, self.timeout_s, self.describe, self.stalled, self.on_stall = (
            what,
            timeout_s,
            describe,
            stalled,
            on_stall,
        )
        self.poll_s = min(poll_s, max(timeout_s / 4, 0.05))
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog:{what}", daemon=True)
        self.fired = False

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            waited = time.monotonic() - self._last
            if waited < self.timeout_s:
                continue
            if not self.stalled():
                self.beat()
                continue
            self.fired = True
            self.on_stall(self.describe(waited))
            return

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
