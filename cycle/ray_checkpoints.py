"""Which of a Ray Train run's checkpoints a restarted worker resumes from.

`ray.train.report(checkpoint=...)` uploads the checkpoint folder to the run's storage first; the
controller registers the report a moment later, when it next polls the workers. A worker killed in
between leaves a complete checkpoint in storage that `ray.train.get_checkpoint()` does not name
(seen here with epochs under a second: a worker killed after two epochs came back with none).
So the restore reads storage itself and takes the newest complete checkpoint, registered or not.

Complete means: its `epoch.json` (written before the files are linked in) names the epoch and the
byte size of each file, and every file in storage has that size (an upload cut off half-way has
not). An epoch's checkpoint holds last.pt, and best.pt when that epoch chose new weights; Ray
keeps the checkpoint with the lowest selection loss (CheckpointConfig's score) besides the
newest, so the weights chosen so far are always in storage: a stage restores from storage alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cycle.io import atomic_write_json
from cycle.layout import BEST, LAST

RAY_EPOCH = "epoch.json"


def stage_files(folder: Path, source: Path, names, **meta) -> Path:
    """`folder` as a checkpoint for Ray to copy: the files `names` of `source` that exist,
    hard-linked in (a copy where links are not possible), nothing else, and RAY_EPOCH (written
    first) with `meta` and each file's byte size."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {n: (source / n).stat().st_size for n in names if (source / n).is_file()}
    for old in folder.iterdir():
        if old.name not in sizes and old.name != RAY_EPOCH:
            old.unlink()
    atomic_write_json(folder / RAY_EPOCH, {**meta, "files": sizes})
    for name in sizes:
        tmp = folder / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source / name, tmp)
        except OSError:
            shutil.copyfile(source / name, tmp)
        os.replace(tmp, folder / name)
    return folder


@dataclass(frozen=True)
class StoredCheckpoint:
    epoch: int
    path: str  # in the storage's file system
    filesystem: object  # pyarrow.fs.FileSystem
    files: tuple[str, ...] = (LAST,)

    def to_directory(self) -> Path:
        """A local copy, in a temporary folder (Ray copies from a local disk too)."""
        import ray.train

        return Path(ray.train.Checkpoint(self.path, filesystem=self.filesystem).to_directory())


def _complete(filesystem, folder: str) -> tuple[int, tuple[str, ...]] | None:
    """(epoch, files) of a checkpoint folder in storage, or None when it is not complete."""
    from pyarrow import fs as pafs

    try:
        with filesystem.open_input_stream(f"{folder}/{RAY_EPOCH}") as handle:
            meta = json.loads(handle.read())
        sizes = meta.get("files") or {LAST: meta["bytes"]}  # older checkpoints: last.pt alone
        if "epoch" not in meta or LAST not in sizes:
            return None
        for name, size in sizes.items():
            info = filesystem.get_file_info(f"{folder}/{name}")
            if info.type != pafs.FileType.File or info.size != size:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return int(meta["epoch"]), tuple(sorted(sizes))


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
            complete = _complete(filesystem, entry.path)
            if complete is not None:
                found.append(StoredCheckpoint(complete[0], entry.path, filesystem, complete[1]))
    return sorted(found, key=lambda c: (c.epoch, c.path))


def run_checkpoints() -> list[StoredCheckpoint]:
    """Inside a Ray Train worker: every complete checkpoint of this run in storage, oldest first:
    the one Ray registered and any newer one it had not registered yet."""
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        complete = _complete(registered.filesystem, registered.path)
        if complete is not None:
            candidates.append(
                StoredCheckpoint(complete[0], registered.path, registered.filesystem, complete[1])
            )
    try:  # a DeveloperAPI: where it moves, the registered checkpoint alone is what we have
        storage = ray.train.get_context().get_storage()
        filesystem, run_folder = storage.storage_filesystem, storage.experiment_fs_path
    except (AttributeError, RuntimeError):
        filesystem = None
    if filesystem is not None:
        candidates += stored_checkpoints(filesystem, run_folder)
    unique = {c.path: c for c in candidates}
    return sorted(unique.values(), key=lambda c: (c.epoch, c.path))


def newest_checkpoint() -> StoredCheckpoint | None:
    """Inside a Ray Train worker: the newest complete checkpoint of this run."""
    return max(run_checkpoints(), key=lambda c: c.epoch, default=None)


def restore_folder(stored: StoredCheckpoint, checkpoints: list[StoredCheckpoint]) -> Path:
    """A local folder with `stored`'s last.pt and the best.pt current at its epoch: its own, or
    that of the newest earlier checkpoint that chose weights (Ray keeps it: its selection loss is
    the lowest)."""
    folder = stored.to_directory()
    if BEST not in stored.files:
        chosen = [c for c in checkpoints if BEST in c.files and c.epoch <= stored.epoch]
        if chosen:
            source = max(chosen, key=lambda c: c.epoch).to_directory()
            shutil.copyfile(source / BEST, folder / BEST)
    return folder
