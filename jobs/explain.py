"""Explain your own chest X-rays with a trained classifier: an overlay PNG per image and a CSV.

    python jobs/explain.py --model outputs/RUN/best.pt IMAGE_OR_DIR... --out DIR [--method auto]
                           [--depth auto] [--lung-model outputs/lungseg/RUN/best.pt]
    python jobs/explain.py --model models:/cycle-classifier@best IMAGE_OR_DIR... --out DIR

`--model` takes a checkpoint file or an MLflow model: `models:/cycle-classifier@best` (the
registered winner), `models:/cycle-classifier/<version>`, `runs:/<run id>/model` (any cycle's
weights), looked up in --tracking-uri (default: $MLFLOW_TRACKING_URI, else ./mlflow.db, where
`python jobs/cycle.py` logs from the same folder).

Writes DIR/overlays/<name>.png (the film with its CAM; the part outside the model's crop dimmed),
DIR/predictions.csv (path, predicted class, probability) and DIR/skipped.csv for files that could
not be read. Exit status 1 when no input could be explained.
"""

from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401  (makes `cycle` importable)

from cycle.checkpoint import load_classifier
from cycle.explain import explain_files
from cycle.lungseg.masks import load_lung_model


def cam_depth(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: use auto or a block count (0, 1, ...)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument(
        "--model",
        required=True,
        help="a classifier checkpoint (best.pt or last.pt) or an MLflow model URI "
        "(models:/cycle-classifier@best, models:/cycle-classifier/3, runs:/<id>/model)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="the MLflow store a models:/ or runs:/ URI is looked up in "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--lung-model",
        help="lung U-Net (jobs/train_lungseg.py): adds each film's lung energy share",
    )
    parser.add_argument("--method", default="auto", choices=["auto", "gradcam", "hirescam"])
    parser.add_argument(
        "--depth",
        default="auto",
        type=cam_depth,
        help="cam.depth: auto (as the cycle maps), 0 = the last feature block, 1 = one earlier",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    try:
        model, preprocess = load_classifier(args.model, tracking_uri=args.tracking_uri)
        lung_model = load_lung_model(args.lung_model) if args.lung_model else None
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        print(f"\r  explained {done}/{total}", end="", file=sys.stderr, flush=True)

    try:
        rows, skipped = explain_files(
            model,
            preprocess,
            args.inputs,
            args.out,
            args.method,
            args.batch_size,
            progress=progress,
            lung_model=lung_model,
            depth=args.depth,
        )
    except ValueError as err:  # a depth this architecture does not have
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    for row in rows:
        share = (
            f"  lung share {row.lung_energy_share:.3f}" if row.lung_energy_share is not None else ""
        )
        print(f"{row.predicted:9s} {row.probability:.3f}{share}  {row.path}")
    for path, reason in skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    print(f"{len(rows)} explained, {len(skipped)} skipped -> {args.out}", file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
