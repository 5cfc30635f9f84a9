"""The GPU path, checked and timed on one CUDA device (no Ray needed: the same code Ray runs).

    python bench/gpu_bench.py [--n 1200] [--size 224] [--out DIR]

1. CAM engine vs pytorch-grad-cam vs a no_grad forward (ResNet-50, batch 64, 224 px), CUDA-
   synchronised medians and peak GPU memory: the speed claim of bench/cam_bench.py, on a GPU.
2. The training loop (`train_func`, in-process, so `Session` picks CUDA) on phantom films at
   real size: ResNet-50 at 224 px, fp32 and bf16 autocast (`train.amp`), epoch time and accuracy.
3. The shard worker (`EnhanceWorker`: classifier CAM + U-Net lung mask + enhancement) on the GPU:
   films/s.
4. The lung U-Net: one training epoch and inference throughput on the GPU.

Prints one JSON line per step and a summary; a failing step is reported and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cycle.config import load_config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def synced(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cam_step(batch: int, size: int, repeats: int) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cycle.cam import grad_cam
    from cycle.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet50", image_size=size).to(DEVICE).eval()
    images = torch.randn(batch, 1, size, size, device=DEVICE)
    peer = GradCAM(model=model, target_layers=[model.features])
    targets = [ClassifierOutputTarget(1)] * batch
    methods = {
        "peer": lambda: peer(input_tensor=images, targets=targets),
        "ours": lambda: grad_cam(model, images, target=1),
        "forward": lambda: torch.no_grad()(model)(images),
    }
    out = {}
    for name, fn in methods.items():
        fn()  # warm-up: cuDNN autotuning, allocator
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out[f"{name}_ms"] = 1000 * synced(fn, repeats)
        if DEVICE.type == "cuda":
            out[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    ours_maps = grad_cam(model, images[:4], target=1)
    peer_maps = torch.from_numpy(peer(input_tensor=images[:4], targets=targets[:4])).to(DEVICE)
    out["max_abs_diff_vs_peer"] = float((ours_maps.float() - peer_maps).abs().max())
    out["peer_over_ours"] = out["peer_ms"] / out["ours_ms"]
    out["ours_over_forward"] = out["ours_ms"] / out["forward_ms"]
    return out


def phantoms(root: Path, n: int) -> Path:
    from cycle.data.phantom import PhantomSpec, write_dataset

    spec = PhantomSpec.from_config(n_train=n, n_val=0, n_test=n // 4, n_test_cf=n // 4)
    return write_dataset(root / "phantoms", spec)


def train_step(root: Path, data: Path, size: int, amp: bool, epochs: int) -> dict:
    from cycle.data.records import load_dataset
    from cycle.train import train_func

    records = root / "records.json"
    if not records.is_file():
        load_dataset(data, val_fraction=0.15, seed=0, cache_dir=root / "cache").save(records)
    run_dir = root / f"train_{'bf16' if amp else 'fp32'}"
    cfg = load_config(
        None,
        [
            f"output_dir={root}",
            "model.arch=resnet50",
            f"data.image_size={size}",
            f"train.epochs={epochs}",
            "train.batch_size=64",
            f"train.amp={str(amp).lower()}",
            "resources.num_workers=0",
        ],
    )
    started = time.perf_counter()
    train_func(
        {"config": cfg.model_dump(mode="json"), "records": str(records), "run_dir": str(run_dir)}
    )
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())["flat"]
    n_train = sum(1 for line in (run_dir / "predictions_val.csv").read_text().splitlines()[1:])
    return {
        "amp": amp,
        "wall_s": time.perf_counter() - started,
        "epoch_s": [round(h["seconds"], 2) for h in history],
        "val_n": n_train,
        "test_accuracy": metrics.get("test_accuracy"),
        "test_cf_accuracy": metrics.get("test_cf_accuracy"),
    }


def shard_worker_step(root: Path, data: Path, size: int) -> dict:
    from cycle.config import load_config as load
    from cycle.data.records import ScanResult, records_of
    from cycle.lungseg.masks import save_lung_model
    from cycle.lungseg.unet import build_unet
    from cycle.shard_builder import EnhanceWorker, iter_enhanced

    cfg = load(
        None,
        [
            f"output_dir={root}",
            "model.arch=resnet50",
            f"data.image_size={size}",
            "cam.batch_size=64",
        ],
    )
    unet_path = root / "unet.pt"
    if not unet_path.is_file():
        save_lung_model(unet_path, build_unet(), image_size=256)
    worker = EnhanceWorker.from_config(str(root / "train_fp32" / "best.pt"), str(unet_path), cfg)
    train = records_of(ScanResult.load(root / "records.json").records, "train")
    list(iter_enhanced(cfg, train[:64], worker, batch_size=64))  # warm-up
    started = time.perf_counter()
    n = sum(len(b["path"]) for b in iter_enhanced(cfg, train, worker, batch_size=64))
    return {
        "films": n,
        "films_per_s": n / (time.perf_counter() - started),
        "device": str(worker.device),
    }


def lungseg_step(root: Path, data: Path) -> dict:
    from cycle.lungseg.data import find_pairs
    from cycle.lungseg.masks import load_lung_model, predict
    from cycle.lungseg.train import train_lungseg

    cfg = load_config(
        None,
        [
            f"output_dir={root}",
            "lungseg.epochs=1",
            "lungseg.image_size=256",
            "lungseg.batch_size=32",
            "tracking.enabled=false",
        ],
    )
    _, pairs, _ = find_pairs(data)
    started = time.perf_counter()
    result = train_lungseg(cfg, pairs, root / "lungseg", log=lambda *_: None)
    wall = time.perf_counter() - started
    model = load_lung_model(next((root / "lungseg").glob("best*.pt")), DEVICE)
    films = [np.random.default_rng(i).integers(0, 255, (512, 512), np.uint8) for i in range(64)]
    predict(model, films[:8])
    sync()
    started = time.perf_counter()
    predict(model, films)
    sync()
    return {
        "pairs": len(pairs),
        "train_1_epoch_s": wall,
        "test_dice": result.get("test_dice"),
        "masks_per_s_512px": 64 / (time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1200, help="phantom training films")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--cpu", action="store_true", help="dry run on the CPU (tiny sizes; checks the script)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("error: no CUDA device: this benchmark checks the GPU path (--cpu for a dry run)")
    root = Path(args.out or tempfile.mkdtemp(prefix="gpu_bench_"))
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    results = {}
    data = None
    steps = [
        ("cam", lambda: cam_step(8 if args.cpu else 64, args.size, args.repeats)),
        ("phantoms", lambda: {"root": str(phantoms(root, args.n))}),
        ("train_fp32", lambda: train_step(root, data, args.size, False, args.epochs)),
        ("train_bf16", lambda: train_step(root, data, args.size, True, args.epochs)),
        ("shard_worker", lambda: shard_worker_step(root, data, args.size)),
        ("lungseg", lambda: lungseg_step(root, data)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        try:
            results[name] = step()
            if name == "phantoms":
                data = Path(results[name]["root"])
        except Exception as err:  # report and go on: one broken step must not hide the others
            results[name] = {
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-1500:],
            }
        results[name]["step_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: results[name]}, default=str), flush=True)
    (root / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
