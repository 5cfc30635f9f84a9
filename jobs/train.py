"""Train and evaluate one classifier on the configured data; print the metrics table.

    python jobs/train.py [--config configs/smoke.yaml] [--set model.arch=resnet18 ...]
        [--run-name NAME]

Rerunning with the same run name resumes from the last completed epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common

from cycle.data.prepare import prepare_records
from cycle.data.records import DataError
from cycle.layout import RECORDS
from cycle.metrics import format_table
from cycle.models import PretrainedWeightsError
from cycle.ray_session import init_ray
from cycle.train import run_training


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    parser.add_argument("--run-name", default=None, help="default: train-<arch>-seed<seed>")
    args = parser.parse_args()
    cfg = _common.config_from(args)
    name = args.run_name or cfg.run_name or f"train-{cfg.model.arch}-seed{cfg.seed}"
    run_dir = Path(cfg.output_dir) / name
    print(
        f"training {cfg.model.arch} ({cfg.data.image_size} px, {cfg.train.epochs} epochs) "
        f"-> {run_dir}",
        flush=True,
    )

    try:
        scan = prepare_records(cfg, verbose=True)
    except DataError as err:
        sys.exit(f"error: {err}")
    if scan.skipped:
        print(f"note: skipped {len(scan.skipped)} unusable file(s); see {run_dir / 'records.json'}")
    records_path = scan.save(run_dir / RECORDS)

    if cfg.resources.num_workers > 0:  # in-process training (num_workers=0) needs no Ray
        init_ray(cfg)
    try:
        flat = run_training(cfg, records_path, run_dir, name)
    except PretrainedWeightsError as err:
        sys.exit(f"error: {err}")
    rows = {}
    for split in ("val", "test", "test_cf"):
        row = {k.removeprefix(f"{split}_"): v for k, v in flat.items() if k.startswith(f"{split}_")}
        if row:
            rows[split] = row
    print(
        "\n" + format_table(rows, columns=("loss", "accuracy", "sensitivity", "specificity", "auc"))
    )
    print(f"\noutputs: {run_dir}")


if __name__ == "__main__":
    main()
