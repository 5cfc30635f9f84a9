"""The refinement cycle, stage by stage, resumable.

    cycle 0:   train each architecture on the original films (the baseline)
    cycle k:   build shards with cycle k-1's model  ->  fine-tune it on them  ->  evaluate
               (classification on the ORIGINAL val/test/test_cf films; localisation on test)

Every stage writes under `output_dir/<run>/cycle_<k>/<arch>/<stage>/` and ends with a `DONE`
marker; a rerun with the same run name skips finished stages and resumes the interrupted one
from its checkpoint. The architectures of a cycle train side by side (one TorchTrainer each, in
threads of this driver); MLflow is written from this thread only (SQLite likes one writer).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cycle import faults
from cycle.config import Config
from cycle.console import log
from cycle.data.prepare import prepare_records
from cycle.data.records import ScanResult, records_of
from cycle.data.shards import read_manifest
from cycle.evaluate import Localization
from cycle.io import atomic_write_json
from cycle.layout import (
    BEST,
    DONE,
    METRICS,
    PANEL,
    PER_IMAGE,
    RECORDS,
    RESULTS,
    SAMPLES,
    SHARD_DATA,
    TIMINGS,
    RunLayout,
    mark_done,
    marked_done,
    stage_config,
)
from cycle.lungseg import ensure_lung_model
from cycle.ray_session import init_ray
from cycle.resources import decide_gpu, peak_rss_mb, trainer_cpus
from cycle.run_config import check_run_config, claim_run, record_run_config
from cycle.shard_builder import build_shards, sample_picture
from cycle.tracking.cycle_runs import LiveCurves, track_cycle
from cycle.train import run_training

# How often the driver passes finished epochs to MLflow while training runs.
LIVE_EVERY_S = 5.0


def finished(stage_dir: Path) -> bool:
    """Marked done, and its outputs still readable: a stage whose files were truncated or damaged
    since is redone (with a message), never trusted into a traceback later."""
    if not marked_done(stage_dir):
        return False
    problem = damaged_outputs(stage_dir)
    if problem:
        log(f"[resume] {stage_dir}: {problem}; redoing this stage")
        (stage_dir / DONE).unlink(missing_ok=True)
        return False
    return True


def damaged_outputs(stage_dir: Path) -> str | None:
    """What is wrong with a finished stage's files, or None. Checks what later stages read."""
    try:
        if stage_dir.name == "shards":
            read_manifest(stage_dir / SHARD_DATA, verify=True)
            return None
        json.loads((stage_dir / METRICS).read_text())
        if stage_dir.name == "train":
            torch.load(stage_dir / BEST, map_location="cpu", weights_only=True)
            for split in ("test", "val"):  # what the evaluation stage takes from it
                Localization.load_from(stage_dir, split)
        elif stage_dir.name == "evaluate":
            dict(np.load(stage_dir / PANEL))
    except Exception as err:  # any unreadable file means the same: redo the stage
        return f"{type(err).__name__}: {err}"
    return None


class StageClock:
    """Wall seconds per (stage, cycle, architectures) of this process (`rows`), added to the run's
    timings.json as each stage ends, after what earlier processes of a resumed run spent. Each
    row also says what this driver process itself spent (CPU seconds, its peak memory so far):
    the work that grows with the films belongs on the cluster, and this shows whether it is."""

    def __init__(self, path: Path):
        self.path = path
        self.earlier: list[dict] = json.loads(path.read_text()) if path.is_file() else []
        self.rows: list[dict] = []  # this process's

    @contextmanager
    def timed(self, stage: str, k: int | None, archs: str):
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            if seconds >= 0.01:  # a stage found done costs nothing worth a row
                self.rows.append(
                    {
                        "stage": stage,
                        "cycle": k,
                        "archs": archs,
                        "seconds": seconds,
                        "driver_cpu_s": time.process_time() - cpu,
                        "driver_cpu_total_s": time.process_time(),  # since the process began
                        "driver_peak_rss_mb": peak_rss_mb(),
                    }
                )
                atomic_write_json(self.path, self.earlier + self.rows)


@dataclass
class CycleState:
    results: dict[str, list[dict]] = field(default_factory=dict)  # arch -> metrics per cycle
    stopped: dict[str, str] = field(default_factory=dict)  # arch -> why it stopped early


def should_stop(history: list[dict], epsilon: float, delta: float) -> str | None:
    """The stop rule, on val (never test): the lung energy share gained less than epsilon, or
    accuracy fell more than delta."""
    if len(history) < 2:
        return None
    prev, last = history[-2], history[-1]
    if last["val_accuracy"] < prev["val_accuracy"] - delta:
        return f"val accuracy fell {prev['val_accuracy'] - last['val_accuracy']:.3f} > {delta}"
    gain = last.get("val_lung_energy_share", np.nan) - prev.get("val_lung_energy_share", np.nan)
    if not np.isnan(gain) and gain < epsilon:
        return f"lung energy share gained {gain:+.3f} < {epsilon}"
    return None


class Runner:
    """`on_cycle(k, arch, metrics)` is called after each evaluated cycle (a Tune trial reports
    there). The work that grows with the films runs on the cluster: the lung U-Net and the
    classifiers on Ray Train workers (films streamed from Ray Data), the CAMs, lung masks and
    probe of each chosen model in its training worker, the shards by Ray Data actors that write
    them; this driver orchestrates, and draws the pictures from what comes back. With
    `inprocess_shards` (inside a Tune trial, where Ray tasks would wait for CPUs the trials hold)
    the shards are written in this process."""

    def __init__(
        self,
        cfg: Config,
        run_name: str,
        tracker=None,
        on_cycle=None,
        inprocess_shards: bool = False,
    ):
        # Workers run in folders of their own: no relative path survives.
        cfg = cfg.with_absolute_paths()
        self.cfg = cfg
        self.paths = RunLayout.of(cfg, run_name)
        self.run_name = run_name
        self.tracker = tracker
        self.on_cycle = on_cycle
        self.inprocess_shards = inprocess_shards
        check_run_config(self.paths.root, cfg)  # a run folder belongs to one config
        self.paths.root.mkdir(parents=True, exist_ok=True)
        record_run_config(self.paths.root, cfg)
        self.use_gpu: bool | None = None  # decided by ensure_ray, when a stage first needs Ray
        self.clock = StageClock(self.paths.file(TIMINGS))  # where the time went, stage by stage

    def ensure_ray(self) -> None:
        """Ray, started (or joined) by the first stage that needs it: a resumed job whose stages
        are done, or an in-process one, starts none (a single GPU box without Ray runs the cycle
        too). GPUs or not is decided then, once for every later stage of the job, and said."""
        if self.use_gpu is not None:
            return
        import ray  # here only: the in-process cycle runs where Ray is not installed

        init_ray(self.cfg)
        self.use_gpu, line = decide_gpu(self.cfg.resources.use_gpu, ray.cluster_resources())
        log(f"[plan] {line}")

    def running_config(self, k: int, arch: str) -> Config:
        """The stage's config (`layout.stage_config`, what its MLflow run records) with the job's
        GPU decision in it, for a stage that runs now."""
        cfg = stage_config(self.cfg, self.paths, k, arch)
        if self.use_gpu is None:
            return cfg
        return cfg.with_overrides({"resources.use_gpu": self.use_gpu})

    def claim(self):
        return claim_run(self.paths.root)

    # -- stages ----------------------------------------------------------------------------------

    def prepare(self) -> tuple[Path, Path]:
        """Records (phantoms made if missing) and the lung model: the cheap-to-check inputs."""
        records_path = self.paths.file(RECORDS)
        if records_path.is_file():
            try:
                ScanResult.load(records_path)
            except Exception as err:  # truncated or damaged: scan again (verdicts are cached)
                log(
                    f"[resume] {records_path} is unreadable ({type(err).__name__}: {err}); "
                    "scanning the data again"
                )
                records_path.unlink()
        if not records_path.is_file():
            prepare_records(self.cfg, verbose=True).save(records_path)
        # Trained (when missing) on a Ray Train worker where the classifiers train on them.
        on_ray = self.ensure_ray if self.cfg.resources.num_workers > 0 else None
        lung_model = ensure_lung_model(self.cfg, log=log, on_ray=on_ray)
        return records_path, lung_model

    def train_stage(
        self, k: int, archs: list[str], records: Path, shards: dict[str, Path], lung_model: Path
    ) -> None:
        pending = [a for a in archs if not finished(self.paths.train(k, a))]
        if not pending:
            return
        how = (
            "side by side"
            if self.cfg.resources.num_workers > 0
            else "in this process, one after another"
        )
        cpus = self.cfg.resources.cpus_per_worker
        if self.cfg.resources.num_workers > 0:
            import ray

            self.ensure_ray()
            workers = self.cfg.resources.num_workers * len(pending)
            if self.cfg.data.decode == "ray_data":  # the decode tasks need CPUs of their own
                cpus = trainer_cpus(cpus, workers, ray.cluster_resources().get("CPU", 0.0))
            if cpus != self.cfg.resources.cpus_per_worker:
                log(
                    f"[cycle {k}] {workers} Ray Train worker(s) ask for {cpus:g} CPU each, not "
                    f"{self.cfg.resources.cpus_per_worker:g}: the rest decodes their films"
                )
        log(f"[cycle {k}] training {', '.join(pending)} {how}")

        def fit(arch: str) -> str:
            stage = self.paths.train(k, arch)
            cfg = self.running_config(k, arch)
            if cpus != cfg.resources.cpus_per_worker:
                cfg = cfg.model_copy(
                    update={"resources": cfg.resources.model_copy(update={"cpus_per_worker": cpus})}
                )
            run_training(
                cfg,
                records,
                stage,
                name=f"{self.run_name}-c{k}-{arch}",
                train_shards=shards.get(arch),
                threads=max(1, int(self.cfg.resources.cpus_per_worker)),
                # The evaluation's CAMs, where the model and its GPU are: no second start.
                localize={"lung_model": str(lung_model), "seed": self.cfg.seed},
            )
            mark_done(stage)
            return arch

        # In-process training (num_workers=0) runs one at a time: torch's global seed and threads
        # are shared. This thread feeds MLflow the epochs as they end (LiveCurves).
        side_by_side = len(pending) if self.cfg.resources.num_workers > 0 else 1
        live = self.live_curves(k, pending)
        with ThreadPoolExecutor(max_workers=side_by_side) as pool:
            running = {pool.submit(fit, arch) for arch in pending}
            while running:
                done, running = wait(running, timeout=LIVE_EVERY_S, return_when=FIRST_COMPLETED)
                for future in done:
                    log(f"[cycle {k}] {future.result()}: training done")
                if live is not None:
                    live.follow()

    def shards_stage(
        self, k: int, archs: list[str], scan: ScanResult, lung_model: Path
    ) -> dict[str, Path]:
        """Each architecture's enhanced training set from its cycle k-1 weights: built side by side
        with Ray Data (each build on its share of the cluster), one after another in-process."""
        pending = [a for a in archs if not finished(self.paths.shards(k, a))]
        if pending and not self.inprocess_shards:
            self.ensure_ray()
        at_once = 1 if self.inprocess_shards else max(1, len(pending))
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            built = pool.map(lambda a: self.build(k, a, scan, lung_model, at_once), archs)
            return dict(zip(archs, built))

    def build(self, k: int, arch: str, scan: ScanResult, lung_model: Path, share: int) -> Path:
        stage = self.paths.shards(k, arch)
        if not finished(stage):
            cfg = self.running_config(k, arch)
            previous = Path(cfg.model.weights_path)  # the previous cycle's best.pt
            train = records_of(scan.records, "train")
            # val too: the fine-tune is selected on val films enhanced the same way (see train_func)
            build_shards(
                cfg,
                train + records_of(scan.records, "val"),
                previous,
                lung_model,
                stage / SHARD_DATA,
                log=log if share == 1 else _naming(arch),
                inprocess=self.inprocess_shards,
                share=share,
                # One actor per GPU share when the job asks for GPUs (resources.use_gpu).
                gpus_per_actor=cfg.resources.gpus_per_worker if cfg.resources.use_gpu else 0.0,
            )
            sample_picture(stage / SHARD_DATA, stage / SAMPLES)
            mark_done(stage)
        return stage / SHARD_DATA

    def evaluate_stage(self, k: int, arch: str) -> dict:
        """The cycle-k weights on the ORIGINAL films, as their training stage measured them: its
        classification metrics, and where its CAMs look on test (the report, the CAM panel) and
        on val (the stop rule, sweeps; test only reports)."""
        stage, train_dir = self.paths.evaluate(k, arch), self.paths.train(k, arch)
        if finished(stage):
            return json.loads((stage / METRICS).read_text())
        metrics = json.loads((train_dir / METRICS).read_text())["flat"]
        on_test = Localization.load_from(train_dir, "test")
        on_val = Localization.load_from(train_dir, "val")
        metrics.update(on_test.summary)
        metrics.update(
            {f"val_{key}": value for key, value in on_val.summary.items() if "_ci_" not in key}
        )
        on_test.save(stage / PANEL, stage / PER_IMAGE)
        faults.reached("evaluate")
        atomic_write_json(stage / METRICS, metrics)
        mark_done(stage)
        return metrics

    # -- the whole job ---------------------------------------------------------------------------

    def run(self) -> CycleState:
        with self.clock.timed("prepare", None, "all"):  # records, phantoms, lung model
            records_path, lung_model = self.prepare()
        scan = ScanResult.load(records_path)
        state = CycleState()
        archs = list(self.cfg.cycles.archs)
        for k in range(self.cfg.cycles.max + 1):
            active = [a for a in archs if a not in state.stopped]
            if not active:
                break
            started = time.perf_counter()
            shards = {}
            if k:
                with self.clock.timed("shards", k, "+".join(active)):
                    shards = self.shards_stage(k, active, scan, lung_model)
            with self.clock.timed("train", k, "+".join(active)):
                self.train_stage(k, active, records_path, shards, lung_model)
            for arch in active:
                with self.clock.timed("evaluate", k, arch):
                    metrics = self.evaluate_stage(k, arch)
                state.results.setdefault(arch, []).append(metrics)
                with self.clock.timed("track", k, arch):
                    self.track(k, arch, metrics, shards.get(arch))
                if self.on_cycle is not None:
                    self.on_cycle(k, arch, metrics)
                why = should_stop(
                    state.results[arch], self.cfg.cycles.stop_epsilon, self.cfg.cycles.stop_delta
                )
                if why and k < self.cfg.cycles.max:
                    state.stopped[arch] = f"after cycle {k}: {why}"
                    log(f"[cycle {k}] {arch} stops: {why}")
            log(f"[cycle {k}] done in {time.perf_counter() - started:.0f}s")
        atomic_write_json(
            self.paths.file(RESULTS), {"results": state.results, "stopped": state.stopped}
        )
        return state

    # -- tracking ----------------------------------------------------------------------------------

    def live_curves(self, k: int, archs: list[str]) -> LiveCurves | None:
        if self.tracker is None:
            return None
        return LiveCurves(self.tracker, self.cfg, self.paths, k, archs)

    def track(self, k: int, arch: str, metrics: dict, shards: Path | None) -> None:
        if self.tracker is None:
            return
        started = time.perf_counter()
        logged = track_cycle(self.tracker, self.cfg, self.paths, k, arch, metrics, shards)
        if logged and self.tracker.active:
            weights = ", weights" if self.cfg.tracking.log_models == "every" else ""
            log(
                f"[cycle {k}] {arch}: metrics, pictures, predictions{weights} logged to MLflow "
                f"in {time.perf_counter() - started:.1f}s"
            )


def _naming(arch: str):
    """`log`, with the architecture in the [shards] lines of builds that run side by side."""
    return lambda line: log(line.replace("[shards]", f"[shards {arch}]", 1))
