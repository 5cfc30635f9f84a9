"""Check a chest X-ray data set before training: counts, the patient split, the skip list.

    python jobs/inspect_data.py ROOT [--json] [--val-fraction 0.15] [--seed 0]

ROOT is a Kaggle `chest_xray` tree or a .zip of it. Exit status 0 when usable images were found
(even if some files were skipped), 1 when none were.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (makes `cycle` importable)

from cycle.config import DataConfig
from cycle.data.records import (
    CLASSES,
    DataError,
    load_dataset,
    patient_counts,
    patient_overlap,
)


def main() -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="chest_xray folder or .zip")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir", default=None, help="where zips are extracted (default: a temp dir)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = load_dataset(
                args.root,
                args.val_fraction,
                args.seed,
                Path(args.cache_dir or tmp),
                verbose=not args.json,
            )
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    counts = result.counts()
    patients = patient_counts(result.records)
    overlap = patient_overlap(result.records)
    skipped = [{"path": s.path, "reason": s.reason} for s in result.skipped]
    if args.json:
        print(
            json.dumps(
                {
                    "root": result.root,
                    "splits": counts,
                    "patients": patients,
                    "patient_overlap": overlap,
                    "skipped": skipped,
                }
            )
        )
        return 0

    print(f"data root: {result.root}")
    print("(Kaggle's val split is folded into train; val is carved from train by patient)\n")
    print(f"{'split':8} {CLASSES[0]:>8} {CLASSES[1]:>10} {'total':>7} {'patients':>9}")
    for split, per in counts.items():
        print(
            f"{split:8} {per['NORMAL']:8d} {per['PNEUMONIA']:10d} "
            f"{sum(per.values()):7d} {patients[split]:9d}"
        )
    if overlap:
        print(
            "\nwarning: patients shared between splits: "
            + ", ".join(f"{k}: {v}" for k, v in overlap.items())
        )
    else:
        print("\nno patient appears in two splits")
    print(f"\nskipped {len(skipped)} file(s)")
    for item in skipped:
        print(f"  {item['path']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
