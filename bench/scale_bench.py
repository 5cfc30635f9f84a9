"""What grows with the data set, measured in one run: the cycle at N and factor x N training films.

    python bench/scale_bench.py [--n 400] [--factor 8] [--size 224] [--skip-shape]

1. Scale. `jobs/cycle.py` (tinyvgg, one Ray Train worker, the baseline and one refinement cycle,
   films of --size px, two training steps an epoch so that only what is consumed need be in
   memory; val and test fixed) on phantoms with N and factor x N training films. For each: a
   Train worker's peak memory (worker-rank0.json of every training stage), the driver's peak
   memory and CPU seconds (timings.json: the driver process's own accounting), and the machine's
   busy CPU seconds over the job (/proc/stat), hence the driver's share.
2. Ingest. The factor x N training films read four ways, films/s: the rows streamed from Ray Data
   and decoded here (data.decode=worker, what a Train worker does by default), decoded by Ray
   Data's tasks (data.decode=ray_data), read in this process (`FilmSet.local_batches`,
   in-process training), and the peer: every film decoded into one
   array before the first step (the preload training did before the stream), with this
   machine's cores in threads. Also what each holds at once.
3. The driver's share in the default's shape: the smoke config with two architectures side by
   side on one Ray Train worker each, phantoms and lung model already built (a first run makes
   them; the second, measured, reuses them). Goal: at most 15% of the job's CPU.

Prints one table per part; the goals (a worker's peak at factor x N at most 60 MB above N's;
the driver's share at most 15%) are printed with the measured figure. Nothing else may run on
the machine meanwhile: the job's CPU is read machine-wide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cycle.config import load_config  # noqa: E402
from cycle.console import quiet_libraries  # noqa: E402
from cycle.data.films import FilmSet  # noqa: E402
from cycle.data.phantom import PhantomSpec, write_dataset  # noqa: E402
from cycle.data.records import load_dataset  # noqa: E402
from cycle.data.transforms import decode_grayscale, preprocess_from_config  # noqa: E402


def busy_cpu_seconds() -> float:
    """Machine-wide CPU seconds spent not idle since boot (/proc/stat, in USER_HZ)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_cycle(out: Path, phantoms: Path, run: str, sets: list[str], config: str | None) -> dict:
    """One `jobs/cycle.py` from a folder of its own; its timings and the machine's CPU."""
    command = [sys.executable, str(ROOT / "jobs" / "cycle.py")]
    if config:
        command += ["--config", str(ROOT / "configs" / config)]
    for item in [
        f"output_dir={out}",
        f"data.phantom.out_dir={phantoms}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        *sets,
    ]:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        [*command, "--run-name", run], cwd=out, env=env, capture_output=True, text=True
    )
    busy, wall = busy_cpu_seconds() - busy, time.perf_counter() - wall
    if proc.returncode != 0:
        sys.exit(f"{run} failed:\n{proc.stderr[-4000:]}")
    rows = json.loads((out / run / "timings.json").read_text())
    workers = {
        p.parent.parent.parent.name: json.loads(p.read_text())["peak_rss_mb"]
        for p in (out / run).glob("cycle_*/*/train/worker-rank0.json")
    }
    return {
        "per_film": per_film_costs(out / run),
        "wall_s": wall,
        "busy_cpu_s": busy,
        "driver_cpu_s": rows[-1]["driver_cpu_total_s"],
        "driver_peak_mb": max(r["driver_peak_rss_mb"] for r in rows),
        "worker_peak_mb": max(workers.values()),
        "worker_peak_mb_by_cycle": dict(sorted(workers.items())),
    }


def per_film_costs(run: Path) -> dict:
    """Seconds per film of each stage that grows with the films, from the run's own records: a
    training step (the last cycle's history.json over the films its epochs read,
    reads-rank0.json), the shard build (timings.json over the manifest's films), the CAMs, lung
    masks and probe of the chosen weights (localized.json)."""
    last = max(run.glob("cycle_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))
    train = next(last.glob("*/train"))
    history = json.loads((train / "history.json").read_text())
    read = len(json.loads((train / "reads-rank0.json").read_text())["films"])
    localized = json.loads((train / "localized.json").read_text())
    manifest = json.loads(next(run.glob("cycle_*/*/shards/data/manifest.json")).read_text())
    timings = json.loads((run / "timings.json").read_text())
    shards = sum(r["seconds"] for r in timings if r["stage"] == "shards")
    return {
        "train_step_s": sum(r["seconds"] for r in history) / (len(history) * read),
        "shards_s": shards / manifest["counts"]["in"],
        "localize_s": localized["seconds"] / localized["films"],
    }


def phantoms(root: Path, n_train: int, size: int) -> Path:
    spec = PhantomSpec.from_config(
        seed=0, n_train=n_train, n_val=16, n_test=100, n_test_cf=100, size=size
    )
    return write_dataset(root, spec, workers=os.cpu_count() or 1)


def scale(tmp: Path, n: int, factor: int, size: int, extra: list[str]) -> tuple[dict, Path]:
    image = round(size * 0.875)
    sets = [
        *extra,
        "cycles.archs=[tinyvgg]",
        "cycles.max=1",
        "resources.num_workers=1",
        f"data.image_size={image}",
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        f"data.phantom.size={size}",
    ]
    results = {}
    for films in (n, factor * n):
        folder = tmp / f"n{films}"
        folder.mkdir()
        started = time.perf_counter()
        root = phantoms(folder / "phantoms", films, size)
        print(f"  {films} training films made in {time.perf_counter() - started:.0f}s", flush=True)
        results[films] = run_cycle(
            folder, root.parent, "scale", [*sets, f"data.phantom.n_train={films}"], None
        )
        print(f"  {films}: {results[films]}", flush=True)
    return results, folder


def ingest(folder: Path, size: int) -> dict:
    """films/s of the training split read three ways, and what each holds at once."""
    import ray

    cfg = load_config(None, [f"data.image_size={round(size * 0.875)}"])
    scan = load_dataset(folder / "phantoms", val_fraction=0.15, seed=0, cache_dir=folder / "cache")
    records = scan.save(folder / "records.json")
    films = FilmSet.originals(records, "train", seed=0)
    pre, pixels = preprocess_from_config(cfg.data), cfg.data.max_image_pixels
    n, film_bytes = len(films), pre.resize_to**2
    out = {}

    started = time.perf_counter()
    held = max(b["image"].nbytes for b in films.local_batches(pre, pixels))
    out["stream, this process"] = (n / (time.perf_counter() - started), held)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        ds = films.ray_dataset(pre, pixels, tasks=os.cpu_count() or 1)
        started = time.perf_counter()
        held = max(
            b["image"].nbytes for b in ds.iter_batches(batch_size=None, batch_format="numpy")
        )
        out["stream, decoded by Ray Data tasks (decode=ray_data)"] = (
            n / (time.perf_counter() - started),
            held,
        )
        rows = films.ray_dataset(pre, pixels, decode=False)
        started = time.perf_counter()
        listed = rows.iter_batches(batch_size=64, batch_format="numpy")
        held = max(b["image"].nbytes for b in films.decoded_rows(listed, pre, pixels))
        out["stream, rows from Ray Data decoded here (decode=worker)"] = (
            n / (time.perf_counter() - started),
            held,
        )
    finally:
        ray.shutdown()

    listing = films.listing()
    started = time.perf_counter()
    preloaded = np.zeros((n, pre.resize_to, pre.resize_to), np.uint8)

    def load(i: int) -> None:
        with open(listing[i]["path"], "rb") as handle:
            preloaded[i] = pre.resize(decode_grayscale(handle.read(), pixels))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(load, range(n)))
    out["preload (peer)"] = (n / (time.perf_counter() - started), preloaded.nbytes)
    assert preloaded.nbytes == n * film_bytes
    return out


def shape(tmp: Path) -> dict:
    """The smoke cycle in the default's shape, twice: the second run is the one measured."""
    folder = tmp / "shape"
    folder.mkdir()
    sets = ["cycles.archs=[tinyvgg,resnet18]", "resources.num_workers=1"]
    run_cycle(folder, folder / "phantoms", "first", sets, "smoke.yaml")
    (lung,) = (folder / "lungseg").glob("*/best.pt")
    return run_cycle(
        folder, folder / "phantoms", "measured", [*sets, f"lungseg.weights={lung}"], "smoke.yaml"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-shape", action="store_true", help="parts 1 and 2 only")
    parser.add_argument("--skip-ingest", action="store_true", help="no part 2")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config of part 1's jobs"
    )
    args = parser.parse_args()
    quiet_libraries()  # Ray Data's progress blocks: this prints its own tables
    print(f"machine: {os.cpu_count()} CPUs; one job at a time", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"1. the cycle at {args.n} and {args.factor * args.n} training films", flush=True)
        results, big = scale(tmp, args.n, args.factor, args.size, args.set)
        reads = None
        if not args.skip_ingest:
            print(
                f"2. ingest of {args.factor * args.n} training films ({args.size} px)", flush=True
            )
            reads = ingest(big, args.size)
        measured = shape(tmp) if not args.skip_shape else None

    small, large = (results[k] for k in sorted(results))
    print()
    print(
        "| training films | worker peak MB | driver peak MB | driver CPU s | job CPU s "
        "| driver share | wall s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for films, r in sorted(results.items()):
        print(
            f"| {films:,} | {r['worker_peak_mb']:.0f} | {r['driver_peak_mb']:.0f} | "
            f"{r['driver_cpu_s']:.0f} | {r['busy_cpu_s']:.0f} | "
            f"{r['driver_cpu_s'] / r['busy_cpu_s']:.0%} | {r['wall_s']:.0f} |"
        )
    costs = {k: f"{v * 1e3:.1f} ms" for k, v in large["per_film"].items()}
    print(f"per film at {max(results):,} films, this machine:", end=" ")
    print(f"training {costs['train_step_s']} (a step's share),", end=" ")
    print(f"shard build {costs['shards_s']}, CAMs + lungs + probe {costs['localize_s']}")
    grown = large["worker_peak_mb"] - small["worker_peak_mb"]
    print(
        f"worker peak at {args.factor}x the films: {grown:+.0f} MB (goal: at most +60 MB) -> "
        f"{'met' if grown <= 60 else 'NOT met'}"
    )
    if reads:
        print()
        print("| ingest | films/s | held at once MB | vs preload |")
        print("|---|---:|---:|---:|")
        peer = reads["preload (peer)"][0]
        for how, (rate, held) in reads.items():
            print(f"| {how} | {rate:.0f} | {held / 2**20:.1f} | {rate / peer:.2f}x |")
    if measured:
        share = measured["driver_cpu_s"] / measured["busy_cpu_s"]
        print()
        print(
            f"driver share, smoke cycle in the default's shape: {measured['driver_cpu_s']:.0f} of "
            f"{measured['busy_cpu_s']:.0f} CPU s = {share:.0%} (goal: at most 15%) -> "
            f"{'met' if share <= 0.15 else 'NOT met'}; wall {measured['wall_s']:.0f}s"
        )


if __name__ == "__main__":
    main()
