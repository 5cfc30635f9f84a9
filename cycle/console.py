"""Talking to the person running a job: the library's only two ways to print."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """Progress and warnings: stderr, flushed at once (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """Progress from inside a Ray Train worker, to stdout, once: Ray Train V2 patches `print`
    into a logger that, beside Ray's own stdout capture, shows every line twice in the log."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Keep MLflow's INFO lines (database migrations, each run's address), its download bars and
    Ray Data's progress block and INFO lines (every dataset a training worker reads, each epoch)
    out of a job's output: the job says what it does itself. Set before MLflow and Ray Data are
    imported, and inherited by a local Ray's workers; a job's `--verbose` skips it."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
