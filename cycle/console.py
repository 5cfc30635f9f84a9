"""Talking to the person running a job: the library's only two ways to print."""

from __future__ import annotations

import atexit
import os
import select
import sys
import threading


def log(message: str) -> None:
    """Progress and warnings: stderr, flushed at once (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """Progress from inside a Ray Train worker, to stdout, once: Ray Train V2 patches `print`
    into a logger that, beside Ray's own stdout capture, shows every line twice in the log."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# Lines Ray and MLflow print that a job's user cannot act on, each seen in a default run or a
# test's. A line holding any of these is dropped from a job's output unless it runs --verbose.
CHATTER = (
    # Ray's core, for every actor Ray Train and Ray Data start (ray-project/ray#53727): harmless.
    "has constructor arguments in the object store and max_restarts > 0",
    # The raylet on a small machine, when Train and Data start their processes at once.
    "PYTHON worker processes have been started on node",
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled. To enable",
    # Ray Train's controller and workers: the job says which stage trains and where it waits.
    "Attempting to start training worker group",
    "Started training worker group of size",
    ") world_rank=",
    "Setting up process group for:",
    "Checkpoint successfully created at",
    "Reporting training result",
    # A detached Train actor that fails to reach the cluster when another local Ray is up.
    "(PlacementGroupCleaner pid=",
    # MLflow's registry; the job prints its own `registered` line.
    "Successfully registered model",
    "Created version '",
)


def hide_chatter(chatter: tuple[str, ...] = CHATTER) -> None:
    """Drop the `chatter` lines from this process's stdout and stderr, whoever writes them:
    Python, Ray's C++ core (which writes to the file descriptor, not to `sys.stderr`), Ray's log
    forwarding from the workers. A pipe stands in front of each stream; a thread passes every other
    line on as it arrives. At exit what is left in the pipes is passed on too."""
    if _FILTERS:
        return
    _FILTERS.extend(_LineFilter(fd, [c.encode() for c in chatter]) for fd in (1, 2))
    atexit.register(pass_on_what_is_left)


_FILTERS: list[_LineFilter] = []


def pass_on_what_is_left() -> None:
    """Put stdout and stderr back and pass on what the filters still hold. At exit this runs by
    itself; a process that ends with `os._exit` (no exit handlers) must call it first, or its
    last lines, the ones that say why it stopped, are lost in the pipes."""
    while _FILTERS:
        _FILTERS.pop().close()


class _LineFilter:
    def __init__(self, fd: int, chatter: list[bytes]):
        sys.stdout.flush()
        sys.stderr.flush()
        self.fd, self.chatter = fd, chatter
        self.original = os.dup(fd)
        self.pipe, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._pump, name=f"console-{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self.pipe], [], [], 0.1)
            if not ready:
                if self.closing.is_set():
                    break  # drained: nothing arrived since the streams were put back
                continue
            chunk = os.read(self.pipe, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not self._is_chatter(line))
            if kept:
                os.write(self.original, kept)
        if pending and not self._is_chatter(pending):
            os.write(self.original, pending)

    def _is_chatter(self, line: bytes) -> bool:
        return any(c in line for c in self.chatter)

    def close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(self.original, self.fd)  # later writes (interpreter shutdown) go straight out
        self.closing.set()
        self.thread.join(timeout=5)


def quiet_libraries() -> None:
    """Keep MLflow's INFO lines (database migrations, each run's address), its download bars and
    Ray Data's progress block and INFO lines (every dataset a training worker reads, each epoch)
    out of a job's output, and the `CHATTER` lines Ray and MLflow print anyway: the job says what it
    does itself. Set before MLflow and Ray Data are imported, and inherited by a local Ray's
    workers; a job's `--verbose` skips it."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    hide_chatter()
