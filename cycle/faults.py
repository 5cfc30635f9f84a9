"""Fault injection for the kill-anywhere tests: `CYCLE_KILL_AT=<point>[@<n>]` makes the process
SIGKILL itself the n-th time (default 1) it reaches `point`. Unset, `reached()` is one dict
lookup. Points: shards:part (a shard file written, the build unfinished), train:step (a
training step, mid-epoch), evaluate (localisation measured, the stage not marked done),
track (an MLflow child run half logged), register (a model version registered, not recorded).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SEEN: Counter = Counter()


def reached(point: str) -> None:
    wanted = os.environ.get("CYCLE_KILL_AT")
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _SEEN[point] += 1
    if _SEEN[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
