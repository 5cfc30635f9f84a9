"""Phantom generator throughput: films/s in memory (one process) and written to disk (all cores).

    python bench/phantom_bench.py [--n 4000] [--size 256]

The goal from the foundation issue: 4,000 films of 256 px written in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cycle.data.phantom import PhantomSpec, generate, write_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    n_mem = min(args.n, 500)
    started = time.perf_counter()
    generate(n_mem, seed=0, size=args.size)
    in_memory = n_mem / (time.perf_counter() - started)

    spec = PhantomSpec.from_config(
        seed=0,
        n_train=args.n - args.n // 5,
        n_val=0,
        n_test=args.n // 10,
        n_test_cf=args.n // 10,
        size=args.size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_dataset(tmp, spec)
        seconds = time.perf_counter() - started
    total = sum(spec.split_sizes().values())
    print(f"machine: {os.cpu_count()} cores")
    print(f"generate in memory, 1 process : {in_memory:8.1f} films/s ({args.size} px)")
    print(
        f"write tree (images + 3 masks) : {total / seconds:8.1f} films/s, "
        f"{total:,} films in {seconds:.1f} s "
        f"({os.cpu_count()} processes)"
    )
    print(f"goal 4,000 films < 60 s       : {'met' if seconds * 4000 / total < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
