"""Enhanced shards on disk: parquet files + `manifest.json`, written all-or-nothing.

A build writes into `<dir>.partial-<id>/` and is renamed to `<dir>/` only when every shard and
the manifest are complete, so a reader never sees half a build. The manifest holds the build key
(config hash + model checkpoints' hashes + inputs), counts (in = written + skipped), the skip
reasons, per-shard row counts and sha256 checksums; reading verifies them.

Row schema: image (PNG bytes of the enhanced film, R x R), label, split, path, patient,
prob_pneumonia, cam_mean, cam_peak_y, cam_peak_x, lung_share, trusted, donor, status, reason.
Only rows with status == "ok" are training data; the others record what was skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from cycle.data.records import Record
from cycle.io import atomic_write_json

MANIFEST = "manifest.json"
OK = "ok"


class ShardError(RuntimeError):
    """Shards that must not be read: missing, half-written, or not matching their manifest."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(tmp_dir: Path, build_key: str, n_in: int, extra: dict) -> dict:
    """Count what the shards in `tmp_dir` hold and write the manifest (last file of a build)."""
    shards, statuses, reasons, untrusted = [], Counter(), Counter(), 0
    for path in sorted(tmp_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=["status", "reason", "trusted"])
        status = table.column("status").to_pylist()
        statuses.update(status)
        reasons.update(r for s, r in zip(status, table.column("reason").to_pylist()) if s != OK)
        untrusted += sum(
            1 for s, t in zip(status, table.column("trusted").to_pylist()) if s == OK and not t
        )
        shards.append(
            {
                "file": path.name,
                "rows": table.num_rows,
                "ok_rows": status.count(OK),
                "sha256": file_sha256(path),
            }
        )
    written = statuses.get(OK, 0)
    skipped = sum(v for k, v in statuses.items() if k != OK)
    manifest = {
        "build_key": build_key,
        "counts": {
            "in": n_in,
            "written": written,
            "skipped": skipped,
            "untrusted_written": untrusted,
            "by_status": dict(statuses),
        },
        "skip_reasons": dict(reasons),
        "shards": shards,
        **extra,
    }
    if written + skipped != n_in:
        raise ShardError(
            f"shard rows ({written} written + {skipped} skipped) do not add up to {n_in} inputs"
        )
    atomic_write_json(tmp_dir / MANIFEST, manifest)
    return manifest


def publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move a complete build into place, replacing an older build."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp_dir.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(out_dir)


def read_manifest(shard_dir: str | Path, verify: bool = True) -> dict:
    """The manifest of a complete build; with `verify`, every shard's size and checksum too."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        partial = sorted(shard_dir.parent.glob(shard_dir.name + ".partial-*"))
        hint = f" (an interrupted build is at {partial[0]}; rerun the build)" if partial else ""
        raise ShardError(f"no complete shard build at {shard_dir}{hint}")
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        file = shard_dir / shard["file"]
        if not file.is_file():
            raise ShardError(f"shard {file} listed in the manifest is missing")
        if verify and file_sha256(file) != shard["sha256"]:
            raise ShardError(
                f"shard {file} does not match its manifest checksum (corrupted or changed)"
            )
    return manifest


def shard_files(shard_dir: str | Path, verify: bool = True) -> list[str]:
    manifest = read_manifest(shard_dir, verify)
    return [str(Path(shard_dir) / s["file"]) for s in manifest["shards"]]


def decode_png(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ShardError("a shard row holds bytes that are not a PNG")
    return image


def load_shards(
    shard_dir: str | Path, verify: bool = True
) -> tuple[list[Record], list[np.ndarray], list[dict]]:
    """In-process read: (records, enhanced films uint8 R x R, per-row stats) of the ok rows."""
    records, films, stats = [], [], []
    for file in shard_files(shard_dir, verify):
        table = pq.read_table(file).to_pylist()
        for row in table:
            if row["status"] != OK:
                continue
            records.append(Record(row["path"], int(row["label"]), row["split"], row["patient"]))
            films.append(decode_png(row["image"]))
            stats.append(
                {
                    k: row[k]
                    for k in ("prob_pneumonia", "lung_share", "trusted", "donor", "cam_mean")
                }
            )
    # Rows in a fixed order (Ray Data writes shards in whatever order its tasks finish), so the
    # sampler's seeded permutation picks the same films however the build was batched.
    order = sorted(range(len(records)), key=lambda i: (records[i].split, records[i].path))
    return [records[i] for i in order], [films[i] for i in order], [stats[i] for i in order]


def read_shards_ray(shard_dir: str | Path, verify: bool = True):
    """A Ray Dataset of the ok rows with `image` (uint8 R x R) and `label`: feed it to Ray Train
    (`datasets={"train": ...}`, then `ray.train.get_dataset_shard("train")` in the loop)."""
    import ray.data
    from ray.data.expressions import col

    def decode(batch: dict) -> dict:
        return {"image": np.stack([decode_png(b) for b in batch["image"]]), "label": batch["label"]}

    ds = ray.data.read_parquet(shard_files(shard_dir, verify)).select_columns(
        ["image", "label", "status"]
    )
    return ds.filter(expr=col("status") == OK).map_batches(decode, batch_format="numpy")
