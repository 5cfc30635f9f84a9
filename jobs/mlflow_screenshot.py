"""A screenshot of the MLflow UI comparing a cycle job's architectures across cycles, taken in the
system Chromium, headless (the README's docs/mlflow_compare.png and docs/mlflow_images.png).

    python jobs/cycle.py
    python jobs/mlflow_screenshot.py [--store sqlite:///mlflow.db] [--experiment cycle]
        [--out docs/mlflow_compare.png] [--filter accuracy]
    python jobs/mlflow_screenshot.py --images resnet18 --out docs/mlflow_images.png

It starts `mlflow ui` on 127.0.0.1 over the store, opens the experiment's training runs as charts
with the latest cycle job's runs expanded and the assistant panel closed, and stops the server.
With `--images ARCH`: the image view instead, that architecture's CAM grids of every cycle side by
side. Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import socket
import sys

import _common  # noqa: F401  (makes `cycle` importable)

from cycle.mlflow_ui import (
    BrowserMissing,
    headless_chromium,
    local_ui,
    screenshot,
    scroll_to_metric_charts,
    show_comparison,
    show_images,
)
from cycle.tracking.tracker import latest_job_runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow tracking store")
    parser.add_argument("--experiment", default="cycle", help="experiment of the cycle job")
    parser.add_argument("--out", default="docs/mlflow_compare.png", help="the PNG to write")
    parser.add_argument("--filter", default="accuracy", help="charts whose name holds this")
    parser.add_argument(
        "--images", metavar="ARCH", help="the image view: ARCH's CAM grids, a cycle each"
    )
    args = parser.parse_args()

    found = latest_job_runs(args.store, args.experiment)
    if found is None:
        sys.exit(f"error: no finished cycle job in experiment {args.experiment!r} of {args.store}")
    experiment_id, job, children = found
    print(f"job run      {job} with {len(children)} (cycle, arch) runs: {', '.join(children)}")
    try:
        with local_ui(args.store, free_port()) as base, headless_chromium() as driver:
            if args.images:
                shown = show_images(driver, base, experiment_id, args.images)
                print(f"images       CAM grids of {len(shown)} {args.images} run(s)")
            else:
                show_comparison(driver, base, experiment_id, children, args.filter)
                scroll_to_metric_charts(driver, args.filter)
            path = screenshot(driver, args.out)
    except BrowserMissing as err:
        sys.exit(f"error: {err}")
    print(f"screenshot   {path}")


if __name__ == "__main__":
    main()
