"""Build the enhanced training set (CAM + lung mask + enhanced film per training image) as shards.

    python jobs/build_shards.py --model outputs/RUN/best.pt --lung-model outputs/lungseg/RUN/best.pt
                                [--config FILE] [--set k=v ...] [--out DIR] [--actors N]

Writes DIR/*.parquet + DIR/manifest.json (default DIR: OUTPUT_DIR/shards/<run>) and
DIR/samples.png (49 films beside their CAMs and enhanced versions). An identical rebuild is a
no-op; an interrupted one leaves nothing readable and is redone by the next run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common

from cycle.data.prepare import prepare_records
from cycle.data.records import DataError, records_of
from cycle.data.shards import MANIFEST
from cycle.layout import SAMPLES
from cycle.model_refs import checkpoint_into, ref_name
from cycle.ray_session import init_ray
from cycle.shard_builder import build_shards, sample_picture
from cycle.store import tracking_uri
from cycle.tracking.tracker import Tracker


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    parser.add_argument(
        "--model",
        required=True,
        help="classifier: a checkpoint (best.pt) or an MLflow model "
        "(models:/cycle-classifier@best, models:/cycle-classifier/3, runs:/<id>/model)",
    )
    parser.add_argument(
        "--lung-model", required=True, help="lung U-Net checkpoint (jobs/train_lungseg.py)"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--actors",
        type=int,
        default=None,
        help=(
            "at most this many Ray Data actors holding the models (default: sized from the cluster)"
        ),
    )
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args()
    cfg = _common.config_from(args)
    named = args.model
    try:  # an MLflow model's checkpoint, kept beside the outputs for the Ray Data workers
        args.model = str(
            checkpoint_into(args.model, Path(cfg.output_dir) / "models", tracking_uri(cfg))
        )
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for path in (args.model, args.lung_model):
        if not Path(path).is_file():
            sys.exit(f"error: checkpoint not found: {path}")
    try:
        scan = prepare_records(cfg, verbose=True)
    except DataError as err:
        sys.exit(f"error: {err}")
    train = records_of(scan.records, "train")
    out = Path(args.out or Path(cfg.output_dir) / "shards" / ref_name(named))

    init_ray(cfg)
    manifest = build_shards(
        cfg,
        train,
        args.model,
        args.lung_model,
        out,
        num_actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
    )
    samples = out / SAMPLES
    if not samples.is_file() or samples.stat().st_mtime < (out / MANIFEST).stat().st_mtime:
        sample_picture(out, samples)  # from the rows that carry the sample films
    with Tracker(cfg, run_name=f"shards-{out.name}", tags={"stage": "shards"}) as tracker:
        tracker.log_config()
        counts = manifest["counts"]
        tracker.log_metrics({f"shards_{k}": v for k, v in counts.items() if isinstance(v, int)})
        tracker.log_artifact(out / MANIFEST)
        if samples.is_file():  # none when no sample film was readable
            tracker.log_artifact(samples)
    print(
        f"in {counts['in']}, written {counts['written']}, skipped {counts['skipped']}, "
        f"untrusted (kept by fallback) {counts['untrusted_written']}"
    )
    for reason, n in manifest["skip_reasons"].items():
        print(f"  skipped {n}: {reason}")
    print(f"shards: {out}")


if __name__ == "__main__":
    main()
