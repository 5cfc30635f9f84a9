"""Epoch time of the training loop under Ray Train (one TorchTrainer worker) vs plain PyTorch.

    python bench/train_bench.py [--arch resnet18] [--size 128] [--n 800] [--epochs 3]

Both run the same `train_func` on the same phantom films and seed: once called directly in this
process, once inside a `TorchTrainer` with one worker (its own process, 2 threads, like the
direct run). Compares the median epoch time as the loop itself measures it (history.json), so
Ray's start-up is reported apart from the per-epoch overhead. Goal: overhead <= 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cycle.config import load_config  # noqa: E402
from cycle.data.phantom import PhantomSpec, write_dataset  # noqa: E402
from cycle.data.records import load_dataset  # noqa: E402
from cycle.train import run_training, train_func  # noqa: E402


def epoch_seconds(run_dir: Path) -> list[float]:
    return [row["seconds"] for row in json.loads((run_dir / "history.json").read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    import ray

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_dataset(
            tmp / "ph",
            PhantomSpec.from_config(
                seed=0, n_train=args.n, n_val=0, n_test=8, n_test_cf=0, size=256
            ),
        )
        cfg = load_config(
            None,
            [
                f"output_dir={tmp}",
                f"model.arch={args.arch}",
                f"data.image_size={args.size}",
                f"train.epochs={args.epochs}",
                "train.early_stopping_patience=100",
                "resources.num_workers=1",
                "resources.cpus_per_worker=2",
            ],
        )
        records = load_dataset(root, 0.15, 0, tmp / "cache").save(tmp / "records.json")

        started = time.perf_counter()
        train_func(
            {
                "config": cfg.model_dump(mode="json"),
                "records": str(records),
                "run_dir": str(tmp / "plain"),
            }
        )
        plain_total = time.perf_counter() - started

        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}},
        )
        started = time.perf_counter()
        run_training(cfg, records, tmp / "ray", name="bench")
        ray_total = time.perf_counter() - started
        ray.shutdown()

        plain = statistics.median(epoch_seconds(tmp / "plain"))
        under_ray = statistics.median(epoch_seconds(tmp / "ray"))
        print(
            f"machine: {os.cpu_count()} cores; "
            f"{args.arch} at {args.size} px, {args.n} phantom films, "
            f"{args.epochs} epochs, 2 threads each"
        )
        print(f"  plain PyTorch       {plain:6.1f} s/epoch (median), {plain_total:6.1f} s in all")
        print(
            f"  TorchTrainer, 1 wk  {under_ray:6.1f} s/epoch (median), {ray_total:6.1f} s in all "
            f"(worker start-up and checkpoint upload included)"
        )
        overhead = under_ray / plain - 1
        print(
            f"  per-epoch overhead  {overhead:+.1%}  "
            f"(goal <= 10%: {'met' if overhead <= 0.10 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
