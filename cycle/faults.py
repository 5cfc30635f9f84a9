"""Fault injection for the kill-anywhere tests.

`CYCLE_KILL_AT=<point>[@<n>]` makes the process SIGKILL itself the n-th time (default 1) it
reaches `point`. `CYCLE_HOLD_AT=<point>[@<n>]` with `CYCLE_HOLD_FILE=<path>` makes it stop there
instead: the first process to get there creates the file (its pid inside) and sleeps until it is
killed from outside (a test kills the whole node it runs on); later processes, such as the one
that resumes, find the file and go on. With `CYCLE_RELEASE_FILE=<path>` too, every process that
gets there adds its pid to the hold file and waits until the release file exists (a test that
must see the stage's pool while all of it is busy). Unset, `reached()` is two dict lookups.

Points: shards:part (a shard file written, the build unfinished), shards:batch (a ShardWriter
actor about to enhance a batch), train:step (a training step,
mid-epoch), evaluate (localisation measured, the stage not marked done), track (an MLflow child
run half logged), register (a model version registered, not recorded).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_SEEN: Counter = Counter()


def _due(variable: str, point: str) -> bool:
    wanted = os.environ.get(variable)
    if not wanted:
        return False
    name, _, nth = wanted.partition("@")
    if name != point:
        return False
    _SEEN[variable, point] += 1
    return _SEEN[variable, point] == int(nth or 1)


def reached(point: str) -> None:
    if _due("CYCLE_KILL_AT", point):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due("CYCLE_HOLD_AT", point):
        release = os.environ.get("CYCLE_RELEASE_FILE")
        if release:
            with open(os.environ["CYCLE_HOLD_FILE"], "a") as handle:
                handle.write(f"{os.getpid()}\n")
            while not os.path.exists(release):
                time.sleep(0.2)
            return
        try:
            fd = os.open(os.environ["CYCLE_HOLD_FILE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # held once already: this is the process after the fault
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        while True:
            time.sleep(60)
