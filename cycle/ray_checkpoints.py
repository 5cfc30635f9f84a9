"""Which of a Ray Train run's checkpoints a restarted worker resumes from.

`ray.train.report(checkpoint=...)` uploads the checkpoint folder to the run's storage first; the
controller registers the report a moment later, when it next polls the workers. A worker killed in
between leaves a complete checkpoint in storage that `ray.train.get_checkpoint()` does not name
(seen here with epochs under a second: a worker killed after two epochs came back with none).
So the restore reads storage itself and takes the newest complete checkpoint, registered or not.

Complete means: its `epoch.json` (written before last.pt is linked in) names the epoch and the
byte size of last.pt, and last.pt in storage has that size (an upload cut off half-way has not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cycle.layout import LAST

RAY_EPOCH = "epoch.json"


@dataclass(frozen=True)
class StoredCheckpoint:
    epoch: int
    path: str  # in the storage's file system
    filesystem: object  # pyarrow.fs.FileSystem

    def to_directory(self) -> Path:
        """A local copy, in a temporary folder (Ray copies from a local disk too)."""
        import ray.train

        return Path(ray.train.Checkpoint(self.path, filesystem=self.filesystem).to_directory())


def complete_epoch(filesystem, folder: str) -> int | None:
    """The epoch a checkpoint folder in storage holds, or None when it is not complete."""
    from pyarrow import fs as pafs

    try:
        with filesystem.open_input_stream(f"{folder}/{RAY_EPOCH}") as handle:
            meta = json.loads(handle.read())
        info = filesystem.get_file_info(f"{folder}/{LAST}")
    except (OSError, ValueError):
        return None
    if info.type != pafs.FileType.File or "bytes" not in meta or info.size != meta["bytes"]:
        return None
    return int(meta["epoch"])


def stored_checkpoints(filesystem, run_folder: str) -> list[StoredCheckpoint]:
    """Every complete checkpoint of the run, oldest epoch first."""
    from pyarrow import fs as pafs

    try:
        entries = filesystem.get_file_info(pafs.FileSelector(run_folder))
    except OSError:  # no such folder yet: nothing stored
        return []
    found = []
    for entry in entries:
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
            epoch = complete_epoch(filesystem, entry.path)
            if epoch is not None:
                found.append(StoredCheckpoint(epoch, entry.path, filesystem))
    return sorted(found, key=lambda c: (c.epoch, c.path))


def newest_checkpoint() -> StoredCheckpoint | None:
    """Inside a Ray Train worker: the newest complete checkpoint of this run, the one Ray
    registered or a newer one it had not registered yet."""
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        epoch = complete_epoch(registered.filesystem, registered.path)
        if epoch is not None:
            candidates.append(StoredCheckpoint(epoch, registered.path, registered.filesystem))
    try:  # a DeveloperAPI: where it moves, the registered checkpoint alone is what we have
        storage = ray.train.get_context().get_storage()
        filesystem, run_folder = storage.storage_filesystem, storage.experiment_fs_path
    except (AttributeError, RuntimeError):
        filesystem = None
    if filesystem is not None:
        candidates += stored_checkpoints(filesystem, run_folder)
    return max(candidates, key=lambda c: c.epoch, default=None)
