"""Lung mask throughput of `cycle.lungseg.masks.predict` (resize in, U-Net, resize back,
post-process).

    python bench/lungseg_bench.py [--sizes 256 512] [--batch 16] [--threads 2]

For each size the U-Net runs at that input size on films of that size; prints masks/s end to end
and for the network alone, so the cost of the pre/post-processing is visible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cycle.lungseg.masks import predict, to_input  # noqa: E402
from cycle.lungseg.unet import build_unet  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


@torch.no_grad()
def network_only(model, x) -> None:
    model(x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_unet().eval()
    print(
        f"machine: {os.cpu_count()} cores, {args.threads} threads, CPU; "
        f"residual UNet, batch {args.batch}"
    )
    for size in args.sizes:
        model.image_size = size
        films = [
            np.random.default_rng(i).integers(0, 255, (size, size), dtype=np.uint8)
            for i in range(args.batch)
        ]
        end_to_end = median_seconds(
            lambda f=films: predict(model, f, batch_size=args.batch), args.repeats
        )
        x = to_input(films, size)
        network = median_seconds(lambda x=x: network_only(model, x), args.repeats)
        print(
            f"  {size:4d} px: {args.batch / end_to_end:7.1f} masks/s end to end, "
            f"{args.batch / network:7.1f} masks/s network only"
        )


if __name__ == "__main__":
    main()
