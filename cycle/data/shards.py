"""Enhanced shards on disk: parquet files + `manifest.json`, written all-or-nothing.

A build writes into `<dir>.partial-<id>/` and is renamed to `<dir>/` only when every shard and
the manifest are complete, so a reader never sees half a build. The manifest holds the build key
(config hash + model checkpoints' hashes + inputs), counts (in = written + skipped, ok rows per
split and label), the skip reasons, and per shard its rows, size, sha256 and the run of the
build's order it holds; reading verifies them.

Row schema: position (the film's place in the build's seeded order), image (PNG bytes of the
enhanced film, R x R), label, split, path, patient, prob_pneumonia, cam_mean, cam_peak_y,
cam_peak_x, lung_share, trusted, donor, status, reason. Only rows with status == "ok" are
training data; the others record what was skipped and why. `cycle.data.films` reads them.
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


def summarize_part(path: str | Path) -> dict:
    """What the manifest says of one shard file: rows, ok rows, sha256, the first and last
    position in the build's order and whether its rows run in that order, statuses, reasons,
    untrusted ok rows, ok rows per (split, label). Reads one file: the builder runs it where the
    file was written (a Ray task), not in the driver."""
    path = Path(path)
    table = pq.read_table(
        path, columns=["position", "status", "reason", "trusted", "split", "label"]
    )
    rows = {name: table.column(name).to_pylist() for name in table.column_names}
    position, status = rows["position"], rows["status"]
    ok = [s == OK for s in status]
    by_split_label: dict[str, Counter] = {}
    for is_ok, split, label in zip(ok, rows["split"], rows["label"]):
        if is_ok:
            by_split_label.setdefault(split, Counter())[str(label)] += 1
    return {
        "file": path.name,
        "rows": table.num_rows,
        "ok_rows": sum(ok),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "first": min(position, default=-1),
        "last": max(position, default=-1),
        "in_order": all(b == a + 1 for a, b in zip(position, position[1:])),
        "statuses": dict(Counter(status)),
        "reasons": dict(Counter(r for s, r in zip(status, rows["reason"]) if s != OK)),
        "untrusted": sum(1 for o, t in zip(ok, rows["trusted"]) if o and not t),
        "by_split_label": {k: dict(v) for k, v in by_split_label.items()},
    }


SHARD_FIELDS = ("file", "rows", "ok_rows", "bytes", "sha256", "first", "last")


def write_manifest(
    tmp_dir: Path, build_key: str, n_in: int, extra: dict, parts: list[dict]
) -> dict:
    """The manifest of the shard files in `tmp_dir` from their summaries (`summarize_part`), the
    last file of a build. The files, in the order of their first position, must hold every input
    exactly once, each a contiguous run of the build's order: readers then read the build's rows
    in that order by reading the files in the manifest's order."""
    parts = sorted(parts, key=lambda p: p["first"])
    expected = 0
    for part in parts:
        if not part["in_order"] or part["first"] != expected:
            raise ShardError(
                f"shard file {part['file']} does not continue the build's order at row "
                f"{expected} (it holds rows {part['first']}..{part['last']}): the build is not "
                "readable in order"
            )
        expected = part["last"] + 1
    statuses, reasons, by_split_label = Counter(), Counter(), {}
    for part in parts:
        statuses.update(part["statuses"])
        reasons.update(part["reasons"])
        for split, labels in part["by_split_label"].items():
            by_split_label.setdefault(split, Counter()).update(labels)
    written = statuses.get(OK, 0)
    skipped = sum(v for k, v in statuses.items() if k != OK)
    if written + skipped != n_in or expected != n_in:
        raise ShardError(
            f"shard rows ({written} written + {skipped} skipped) do not add up to {n_in} inputs"
        )
    manifest = {
        "build_key": build_key,
        "counts": {
            "in": n_in,
            "written": written,
            "skipped": skipped,
            "untrusted_written": sum(p["untrusted"] for p in parts),
            "by_status": dict(statuses),
            "by_split_label": {k: dict(v) for k, v in sorted(by_split_label.items())},
        },
        "skip_reasons": dict(reasons),
        # Each file, and where it was written (node_id, pid: the Ray node and the process).
        "shards": [{k: p[k] for k in (*SHARD_FIELDS, "node_id", "pid") if k in p} for p in parts],
        **extra,
    }
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
        if file.stat().st_size != shard.get("bytes", file.stat().st_size):
            raise ShardError(
                f"shard {file} is not the size its manifest says (truncated or changed)"
            )
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
