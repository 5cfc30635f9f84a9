"""Train the lung-segmentation U-Net; report test Dice and IoU with 95% intervals.

    python jobs/train_lungseg.py [--config FILE] [--set k=v ...] [--data DIR] [--run-name NAME]

DIR is a lung-mask data set: Montgomery (CXR_png + ManualMask/leftMask, rightMask), Shenzhen or
any images/ + masks/ pair of folders, JSRT/SCR ('left lung', 'right lung' mask folders). Without
--data it trains on the phantom lung masks, on one Ray Train worker (resources.num_workers=0:
in this process). Rerunning with the same run name resumes.
The weights go to OUTPUT_DIR/lungseg/RUN/best.pt: pass them to the cycle as lungseg.weights=...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common

from cycle.data.prepare import data_root
from cycle.data.records import DataError
from cycle.lungseg.data import LungDataError, find_pairs
from cycle.lungseg.train import BEST, HISTORY, fit_lungseg, summary_line
from cycle.ray_session import init_ray
from cycle.tracking.tracker import Tracker


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    parser.add_argument("--data", help="lung-mask data set folder (default: the phantom masks)")
    parser.add_argument("--run-name", default=None)
    args = parser.parse_args()
    cfg = _common.config_from(args)
    try:
        root = Path(args.data) if args.data else data_root(cfg, verbose=True).parent
        layout, pairs, skipped = find_pairs(
            root, cfg.data.val_fraction, seed=cfg.seed, cache_dir=Path(cfg.output_dir) / "cache"
        )
    except (LungDataError, DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    name = args.run_name or f"{layout}-{cfg.lungseg.image_size}px-seed{cfg.seed}"
    out = Path(cfg.output_dir) / "lungseg" / name
    counts = {s: sum(p.split == s for p in pairs) for s in ("train", "val", "test")}
    print(
        f"lung U-Net on {root} ({layout} layout): {counts}, {len(skipped)} skipped -> {out}",
        flush=True,
    )
    for item in skipped[:20]:
        print(f"  skipped {item.path}: {item.reason}")

    with Tracker(
        cfg, run_name=f"lungseg-{name}", tags={"stage": "lungseg", "layout": layout}
    ) as tracker:
        tracker.log_config()
        on_ray = cfg.resources.num_workers > 0  # a Ray Train worker, with the classifiers' GPUs
        if on_ray:
            init_ray(cfg)
        metrics = fit_lungseg(cfg, pairs, out, on_ray=on_ray)
        for row in json.loads((out / HISTORY).read_text()):
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        tracker.log_artifact(out / "masks_pred_vs_true.png")
        tracker.log_artifact(out / BEST, "weights")
    print(summary_line(metrics))
    print(f"weights: {out / BEST}")


if __name__ == "__main__":
    main()
