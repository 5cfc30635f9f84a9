"""Talking to the person running a job: the library's only two ways to print."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Progress and warnings: stderr, flushed at once (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """Progress from inside a Ray Train worker, to stdout, once: Ray Train V2 patches `print`
    into a logger that, beside Ray's own stdout capture, shows every line twice in the log."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
