"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class LockHeld(RuntimeError):
    """Another live process holds the lock of a folder this process was about to write."""


@contextmanager
def folder_lock(folder: str | Path, what: str, wait: bool, log: Callable[[str], None] = print):
    """Hold `.<folder>.lock` beside the folder (an flock, released by the kernel when the holder
    dies) for the block.
    `wait=False` refuses at once with LockHeld naming the holder (a run folder: two jobs must
    never write one run); `wait=True` waits for it (a shared cache: the second job reuses what
    the first made). A lock file left by a dead process is taken over, with a message."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"  # beside it: a rebuilt folder keeps its lock
    handle = open(path, "a+")
    held = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _, holder = _lock_holder(path)
            if not wait:
                raise LockHeld(
                    f"{what} ({folder}) is in use by {holder}; wait for it to finish, or stop "
                    "it, or pick another name"
                ) from None
            log(f"waiting for {holder} to finish with {what} ({folder}) ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            pid, previous = _lock_holder(path)
            if pid is not None and pid != os.getpid():
                log(
                    f"taking over the lock of {what} ({folder}) left by {previous}, "
                    "which is no longer running"
                )
        held = True
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        yield
    finally:
        try:
            if held:
                handle.seek(0)
                handle.truncate()  # a clean release leaves no holder behind
        finally:
            handle.close()


def _lock_holder(path: Path) -> tuple[int | None, str]:
    """(pid, "process N [on host]") of what the lock file names; (None, "another process") if
    none."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid, host = info.get("pid"), info.get("host")
    if not pid:
        return None, "another process"
    return pid, f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
