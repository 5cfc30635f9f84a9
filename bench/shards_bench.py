"""Enhanced-shard building throughput: the notebook's loop vs batched vs the Ray Data pipeline.

    python bench/shards_bench.py [--n 2000] [--arch resnet18] [--size 128]

On the same phantom films and the same (randomly initialised) classifier and lung U-Net:
  (a) sequential: one film at a time, as the original notebook did (load, CAM, lung mask,
      context swap with a random donor, PNG), rows written to one parquet file at the end;
  (b) batched in one process: `enhance_inprocess` (the pipeline's own code, no Ray);
  (c) the Ray Data pipeline (`build_shards`) with 1 and 2 actors.
Prints films/s, the ratios (c)/(a) (goal >= 2) and (c)/(b) (goal >= 0.75), and the peak RSS of
the whole Ray job (driver + workers) for N/4 and N films (goal: flat, i.e. streaming).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cycle.cam import compute_cam  # noqa: E402
from cycle.checkpoint import save_classifier  # noqa: E402
from cycle.config import load_config  # noqa: E402
from cycle.data.phantom import PhantomSpec, write_dataset  # noqa: E402
from cycle.data.records import records_of, scan  # noqa: E402
from cycle.data.transforms import load_grayscale  # noqa: E402
from cycle.enhance import enhance_batch  # noqa: E402
from cycle.lungseg.masks import predict, save_lung_model  # noqa: E402
from cycle.lungseg.unet import build_unet  # noqa: E402
from cycle.models import build_model  # noqa: E402
from cycle.shard_builder import EnhanceWorker, build_shards, enhance_inprocess  # noqa: E402


def sequential(cfg, records, worker) -> None:
    """The notebook's way: everything per film, batch of one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = []
    pre = worker.pre
    for record in records:
        film = pre.resize(load_grayscale(record.path))
        donor = pre.resize(load_grayscale(records[int(rng.integers(len(records)))].path))
        x = pre.normalise(pre.crop(film))[None]
        cam, logits = compute_cam(worker.model, x, method=cfg.cam.method, return_logits=True)
        r, s = pre.resize_to, pre.size
        canvas = np.zeros((1, r, r), np.float32)
        canvas[:, (r - s) // 2 : (r - s) // 2 + s, (r - s) // 2 : (r - s) // 2 + s] = cam.numpy()
        lungs = np.stack(predict(worker.unet, [film, donor]))
        both = np.stack([film, donor]).astype(np.float32) / 255.0
        cams = np.concatenate([canvas, canvas])
        out = enhance_batch(both, cams, lungs, "context_swap", 1.0, 0.0, "original", rng).images[0]
        rows.append(
            {
                "image": cv2.imencode(".png", np.round(out * 255).astype(np.uint8))[1].tobytes(),
                "label": record.label,
                "prob": float(logits.softmax(1)[0, 1]),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / "out.parquet")


def batched(cfg, records, worker) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches = enhance_inprocess(cfg, records, worker, batch_size=cfg.cam.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pydict({"image": [x for b in batches for x in b["image"]]})
        pq.write_table(table, Path(tmp) / "out.parquet")


def _tree_rss_mib(root_pid: int) -> float:
    """RSS of the driver plus every Ray process of this session (they are its descendants or
    carry 'ray::' in their command line)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if int(pid) == root_pid or b"ray::" in cmd:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError):
            continue
    return total / 2**20


def ray_run(cfg, records, clf, unet, actors: int) -> tuple[float, float]:
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_mib(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build_shards(
            cfg,
            records,
            clf,
            unet,
            Path(tmp) / "shards",
            num_actors=actors,
            threads_per_actor=1,
            log=lambda *_: None,
        )
        seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_dataset(
            tmp / "ph",
            PhantomSpec.from_config(
                seed=0, n_train=args.n, n_val=0, n_test=4, n_test_cf=0, size=256
            ),
        )
        records = records_of(scan(root).records, "train")
        cfg = load_config(
            None,
            [
                f"output_dir={tmp}",
                f"model.arch={args.arch}",
                f"data.image_size={args.size}",
                "enhance.mode=context_swap",
                "enhance.strength=1.0",
            ],
        )
        torch.manual_seed(0)
        clf = save_classifier(tmp / "clf.pt", build_model(args.arch, image_size=args.size), cfg)
        save_lung_model(tmp / "unet.pt", build_unet(), image_size=128)
        worker = EnhanceWorker.from_config(str(clf), str(tmp / "unet.pt"), cfg)
        n = len(records)
        print(
            f"machine: {os.cpu_count()} cores; {n:,} phantom films, {args.arch} at {args.size} px, "
            f"U-Net at 128 px, context_swap"
        )

        small = records[: max(8, n // 8)]  # the loop is slow: time it on a slice, report films/s
        started = time.perf_counter()
        sequential(cfg, small, worker)
        rate_a = len(small) / (time.perf_counter() - started)
        started = time.perf_counter()
        batched(cfg, records, worker)
        rate_b = n / (time.perf_counter() - started)
        print(f"  (a) sequential loop      {rate_a:7.1f} films/s  (timed on {len(small)} films)")
        print(f"  (b) batched, in-process  {rate_b:7.1f} films/s")

        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}},
        )
        results = {}
        for actors in (1, 2):
            seconds, peak = ray_run(cfg, records, clf, tmp / "unet.pt", actors)
            results[actors] = n / seconds
            print(
                f"  (c) Ray Data, {actors} actor(s)  {n / seconds:7.1f} films/s  "
                f"peak RSS {peak:,.0f} MiB"
            )
        best = max(results.values())
        print(
            f"\n  (c)/(a) = {best / rate_a:5.2f}x  "
            f"(goal >= 2: {'met' if best / rate_a >= 2 else 'MISSED'})"
        )
        print(
            f"  (c)/(b) = {best / rate_b:5.2f}   "
            f"(goal >= 0.75: {'met' if best / rate_b >= 0.75 else 'MISSED'})"
        )
        _, peak_quarter = ray_run(cfg, records[: n // 4], clf, tmp / "unet.pt", 2)
        _, peak_full = ray_run(cfg, records, clf, tmp / "unet.pt", 2)
        print(
            f"  peak RSS, 2 actors: {n // 4:,} films {peak_quarter:,.0f} MiB, "
            f"{n:,} films {peak_full:,.0f} MiB "
            f"(x{peak_full / peak_quarter:.2f} for x4 data)"
        )
        ray.shutdown()


if __name__ == "__main__":
    main()
