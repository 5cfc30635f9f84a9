"""CAM engine speed against its peer and its floor, measured in one process.

    python bench/cam_bench.py [--arch resnet50] [--batch 16] [--size 224] [--threads 2]
        [--repeats 7]

Prints the median time per batch of
  peer      pytorch-grad-cam's GradCAM (full forward with autograd + loss.backward()),
  ours      cycle.cam.grad_cam (features without autograd, head with autograd),
  forward   a plain torch.no_grad() forward pass (the floor: a CAM needs one forward),
in alternating order, and the ratios peer/ours (goal >= 3) and ours/forward (goal <= 1.25).
Then images/s of our engine for every architecture at the configured size, and peak memory
(RSS growth above the steady state of a fresh process, sampled every ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cycle.cam import compute_cam, grad_cam  # noqa: E402
from cycle.config import Config  # noqa: E402
from cycle.models import available_architectures, build_model  # noqa: E402


def _methods(model, images):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer = GradCAM(model=model, target_layers=[model.features])
    targets = [ClassifierOutputTarget(1)] * len(images)

    def run_peer():
        peer(input_tensor=images, targets=targets)

    def run_ours():
        grad_cam(model, images, target=1)

    def run_forward():
        with torch.no_grad():
            model(images)

    return {"peer": run_peer, "ours": run_ours, "forward": run_forward}


def _setup(arch: str, size: int, batch: int):
    torch.manual_seed(0)
    model = build_model(arch, image_size=size).eval()
    images = torch.randn(batch, 1, size, size)
    return model, images


def compare(arch: str, size: int, batch: int, repeats: int) -> dict[str, float]:
    model, images = _setup(arch, size, batch)
    methods = _methods(model, images)
    for fn in methods.values():  # warm-up: allocator, oneDNN kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():  # alternate, so drift hits every method alike
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mib(method: str, arch: str, size: int, batch: int) -> float:
    """Run one method in a fresh process; return its peak RSS growth over the loaded model."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--_peak",
            method,
            "--arch",
            arch,
            "--size",
            str(size),
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_child(method: str, arch: str, size: int, batch: int) -> None:
    """Sample RSS every millisecond while the method runs; report the peak over the start."""
    model, images = _setup(arch, size, batch)
    fn = _methods(model, images)[method]
    fn()  # first call allocates caches every method keeps; measure the steady state
    gc.collect()
    start = _rss_mib()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    print(json.dumps({"mib": peak[0] - start}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--zoo-size",
        type=int,
        default=Config().data.image_size,
        help="size for the per-architecture throughput table (default: the config's)",
    )
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._peak:
        _peak_child(args._peak, args.arch, args.size, args.batch)
        return

    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, CPU"
    )
    print(
        f"{args.arch}, batch {args.batch}, {args.size} px, "
        f"median of {args.repeats} alternating runs\n"
    )
    t = compare(args.arch, args.size, args.batch, args.repeats)
    for name in ("peer", "ours", "forward"):
        print(f"  {name:8s} {t[name] * 1000:9.1f} ms/batch  {args.batch / t[name]:7.1f} images/s")
    speedup, overhead = t["peer"] / t["ours"], t["ours"] / t["forward"]
    print(
        f"\n  peer / ours    = {speedup:5.2f}x  "
        f"(goal >= 3.00x: {'met' if speedup >= 3 else 'MISSED'})"
    )
    print(
        f"  ours / forward = {overhead:5.2f}x  "
        f"(goal <= 1.25x: {'met' if overhead <= 1.25 else 'MISSED'})"
    )

    print("\npeak memory during one call (RSS above the process's steady state, sampled every ms):")
    for name in ("peer", "ours", "forward"):
        print(f"  {name:8s} {peak_rss_mib(name, args.arch, args.size, args.batch):8.1f} MiB")

    if not args.skip_zoo:
        print(
            f"\nour engine per architecture ({args.zoo_size} px, batch {args.batch}, auto method):"
        )
        for arch in available_architectures():
            model, images = _setup(arch, args.zoo_size, args.batch)
            compute_cam(model, images)
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                compute_cam(model, images)
                runs.append(time.perf_counter() - started)
            print(
                f"  {arch:10s} {model.cam_method:9s} "
                f"{args.batch / statistics.median(runs):8.1f} images/s"
            )


if __name__ == "__main__":
    main()
