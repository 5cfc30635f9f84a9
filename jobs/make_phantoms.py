"""Write the synthetic chest X-ray benchmark in the Kaggle layout.

python jobs/make_phantoms.py --out /tmp/p [--n-train 2000 --n-test 400 --n-test-cf 400 ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401  (makes `cycle` importable)
import cv2

from cycle.config import PhantomConfig
from cycle.data.phantom import PhantomSpec, generate, preview_grid, split_seed, write_dataset
from cycle.io import atomic_write_bytes


def main() -> None:
    defaults = PhantomConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="output folder; the tree goes to OUT/chest_xray"
    )
    for field in ("n_train", "n_val", "n_test", "n_test_cf", "size", "seed", "images_per_patient"):
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field)
        )
    for field in ("pneumonia_fraction", "shortcut", "border_shortcut"):
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=float, default=getattr(defaults, field)
        )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument(
        "--force", action="store_true", help="replace a tree made from another spec"
    )
    parser.add_argument(
        "--preview", metavar="PNG", help="also write a contact sheet of the first train films"
    )
    args = parser.parse_args()

    values = {k: v for k, v in vars(args).items() if k in PhantomConfig.model_fields}
    try:
        spec = PhantomSpec.from_config(PhantomConfig(**values))
    except ValueError as err:
        sys.exit(f"error: {err}")
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\r  {done:,}/{total:,} films", end="", file=sys.stderr, flush=True)

    try:
        root = write_dataset(
            args.out, spec, workers=args.workers, force=args.force, progress=progress
        )
    except FileExistsError as err:
        sys.exit(f"\nerror: {err}")
    total = sum(spec.split_sizes().values())
    print(
        f"\nwrote {total:,} films to {root} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    if args.preview:
        write_preview(spec, args.preview)
        print(f"preview: {args.preview}", file=sys.stderr)
    print(root)


def write_preview(spec, path: str, n: int = 8) -> None:
    films = generate(n, split_seed(spec.seed, "train"), spec.params)
    ok, png = cv2.imencode(".png", preview_grid(films, cols=2))
    atomic_write_bytes(path, png.tobytes())


if __name__ == "__main__":
    main()
