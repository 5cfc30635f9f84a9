"""A screenshot of the MLflow UI comparing a cycle job's architectures across cycles, taken in the
system Chromium, headless (the README's docs/mlflow_compare.png).

    python jobs/cycle.py --config configs/smoke.yaml --set "cycles.archs=[tinyvgg,resnet18]"
    python jobs/mlflow_screenshot.py --experiment cycle-smoke [--store sqlite:///mlflow.db]
        [--out docs/mlflow_compare.png] [--filter accuracy]

It starts `mlflow ui` on 127.0.0.1 over the store, opens the experiment's training runs as charts
with the latest cycle job's runs expanded and the assistant panel closed, and stops the server.
Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver).
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
    show_comparison,
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
    args = parser.parse_args()

    found = latest_job_runs(args.store, args.experiment)
    if found is None:
        sys.exit(f"error: no finished cycle job in experiment {args.experiment!r} of {args.store}")
    experiment_id, job, children = found
    print(f"job run      {job} with {len(children)} (cycle, arch) runs: {', '.join(children)}")
    try:
        with local_ui(args.store, free_port()) as base, headless_chromium() as driver:
            show_comparison(driver, base, experiment_id, children, args.filter)
            path = screenshot(driver, args.out)
    except BrowserMissing as err:
        sys.exit(f"error: {err}")
    print(f"screenshot   {path}")


if __name__ == "__main__":
    main()
