"""Train and evaluate one architecture: a `train_func(config)` that runs in-process, on one Ray
Train worker or on many (DDP), and resumes from its last checkpoint after a crash.

Read top to bottom: data -> model -> optimiser -> resume -> epochs (train, validate, checkpoint,
early stop) -> reload the best weights (chosen on val, never on test) -> evaluate every split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cycle import faults
from cycle.checkpoint import (
    model_meta,
    read_checkpoint,
    restore_training_state,
    save_classifier,
    save_training_state,
)
from cycle.config import Config
from cycle.console import say
from cycle.data.dataset import EpochShuffle, ImageDataset
from cycle.data.records import ScanResult, records_of
from cycle.data.shards import load_shards
from cycle.data.transforms import augment_from_config, preprocess_from_config
from cycle.evaluate import EVAL_SPLITS, autocast, evaluate_splits, split_metrics
from cycle.io import atomic_write_json
from cycle.layout import BEST, EPOCH_LOG, HISTORY, LAST, METRICS, RAY_CHECKPOINT, STARTED
from cycle.metrics import format_table, prefixed
from cycle.models import Classifier, build_model
from cycle.ray_checkpoints import RAY_EPOCH, newest_checkpoint
from cycle.resources import decide_gpu, trainer_request, waiting_message
from cycle.watchdog import Watchdog

# The stage's files are named in cycle.layout: BEST (the weights with the lowest val loss so far),
# LAST (model, optimiser, scheduler, epoch, early-stopping state, history), STARTED; RAY_EPOCH
# (beside LAST in Ray's checkpoint: its epoch and last.pt's size) in cycle.ray_checkpoints.


# ---------------------------------------------------------------------------------------------
# Where we run: in-process, or inside Ray Train


@dataclass
class Session:
    in_ray: bool
    rank: int
    world_size: int
    device: torch.device
    ray_checkpoints: bool

    @classmethod
    def detect(cls, ray_checkpoints: bool, in_process: bool = False) -> Session:
        if not in_process:
            try:
                import ray.train
                import ray.train.torch

                ctx = ray.train.get_context()
                return cls(
                    True,
                    ctx.get_world_rank(),
                    ctx.get_world_size(),
                    ray.train.torch.get_device(),
                    ray_checkpoints,
                )
            # Not inside trainer.fit() (RuntimeError), or inside a Tune trial (DeprecationWarning).
            except (ImportError, RuntimeError, DeprecationWarning):
                pass
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(False, 0, 1, device, False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume_file(self, run_dir: Path) -> tuple[Path, str, str] | None:
        """(file to read, where it came from, its location there): the newest complete checkpoint
        in Ray's storage (a restarted worker, maybe on another node; see cycle.ray_checkpoints),
        unless this node's own last.pt is newer."""
        path = run_dir / LAST
        if self.in_ray and self.ray_checkpoints:
            stored = newest_checkpoint()
            history = run_dir / HISTORY
            local_epoch = (
                len(json.loads(history.read_text())) if path.is_file() and history.is_file() else -1
            )
            if stored is not None and stored.epoch >= local_epoch:
                local = stored.to_directory() / LAST
                return local, "Ray storage checkpoint", f"{stored.path}/{LAST}"
        return (path, "local checkpoint", str(path)) if path.is_file() else None

    def distributed(self, model: nn.Module) -> nn.Module:
        """DDP across the Ray Train workers; the model itself with one worker or none."""
        if not (self.in_ray and self.world_size > 1):
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """A barrier in Ray: every rank calls it equally often; only rank 0 hands a checkpoint."""
        if not self.in_ray:
            return
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.is_main:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------
# Pieces


def stage_for_ray(last: Path, ray_dir: Path, epoch: int) -> Path:
    """The folder Ray copies to storage_path: last.pt hard-linked in (no second write of the
    whole checkpoint each epoch), a copy where links are not possible, and its epoch (read on
    resume without loading the checkpoint)."""
    ray_dir.mkdir(parents=True, exist_ok=True)
    # Before last.pt goes in: a checkpoint is complete once last.pt has the size said here.
    atomic_write_json(ray_dir / RAY_EPOCH, {"epoch": epoch, "bytes": last.stat().st_size})
    target = ray_dir / LAST
    tmp = ray_dir / f".{LAST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, target)
    return ray_dir


def quiet_ray_train_logs() -> None:
    """Our epoch line says it better than Train's per-report INFO lines (one of which logs under
    its file path, not under 'ray.train')."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def make_model(cfg: Config) -> Classifier:
    return build_model(
        cfg.model.arch,
        num_classes=2,
        pretrained=cfg.model.pretrained,
        unfreeze=cfg.model.unfreeze,
        image_size=cfg.data.image_size,
        dropout=cfg.model.dropout,
        weights_path=cfg.model.weights_path,
    )


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True
        )
    optimizer_cls = {
        "adamw": torch.optim.AdamW,
        "adam": torch.optim.Adam,
        "radam": torch.optim.RAdam,
    }[t.optimizer]
    return optimizer_cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    if cfg.train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def make_criterion(cfg: Config, labels: np.ndarray, device: torch.device) -> nn.Module:
    """Cross-entropy, with inverse-frequency class weights unless train.class_weights=none."""
    if cfg.train.class_weights == "none":
        return nn.CrossEntropyLoss()
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = torch.tensor(len(labels) / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weights.to(device))


def loader(dataset: ImageDataset, cfg: Config, session: Session, shuffle: bool) -> DataLoader:
    sampler = EpochShuffle(
        len(dataset), cfg.seed, session.rank, session.world_size, shuffle=shuffle
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size if shuffle else max(cfg.train.batch_size, 64),
        sampler=sampler,
        num_workers=cfg.data.loader_workers,
        pin_memory=session.device.type == "cuda",
        drop_last=False,
    )


def train_one_epoch(
    model, data, optimizer, criterion, cfg: Config, session: Session
) -> dict[str, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for step, (images, labels, _) in enumerate(data):
        if cfg.train.max_steps_per_epoch and step >= cfg.train.max_steps_per_epoch:
            break
        images = images.to(session.device, non_blocking=True)
        labels = labels.to(session.device, non_blocking=True)
        with autocast(cfg, session.device):
            logits = model(images).float()
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        faults.reached("train:step")
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


# ---------------------------------------------------------------------------------------------
# The loop, step by step


@dataclass
class LoopConfig:
    """What `train_func` needs besides the Config. Plain values: Ray ships it to each worker as
    `train_loop_config` (a dict of these fields)."""

    config: dict  # the Config, dumped, every path absolute
    records: str  # records.json of the data set
    run_dir: str  # where last.pt, best.pt, history.json, metrics.json go
    ray_checkpoints: bool = False  # also hand each epoch's checkpoint to Ray's storage_path
    train_shards: str | None = None  # train (and select) on these enhanced films
    threads: int | None = None  # torch threads per Ray worker (trainers sharing a machine)
    in_process: bool = False  # called directly, not by Ray Train (e.g. inside a Tune trial)


def build_datasets(
    cfg: Config, scan: ScanResult, train_shards: str | None
) -> dict[str, ImageDataset]:
    """train, val, test, test_cf from the records. With shards, train is the enhanced films and
    "select" the enhanced val films (what the epoch is chosen on); val, test and test_cf stay
    the original films."""
    preprocess = preprocess_from_config(cfg.data)
    augment = augment_from_config(cfg.train.augment)
    datasets = {
        split: ImageDataset(
            records_of(scan.records, split),
            preprocess,
            augment if split == "train" else None,
            seed=cfg.seed,
            cache=cfg.data.cache_images,
            max_pixels=cfg.data.max_image_pixels,
        )
        for split in ("train", *EVAL_SPLITS)
    }
    if train_shards:
        records, films, _ = load_shards(train_shards)
        by_split = {s: [i for i, r in enumerate(records) if r.split == s] for s in ("train", "val")}

        def enhanced(split: str, augment_with) -> ImageDataset:
            rows = by_split[split]
            return ImageDataset(
                [records[i] for i in rows],
                preprocess,
                augment_with,
                seed=cfg.seed,
                resized=[films[i] for i in rows],
            )

        datasets["train"] = enhanced("train", augment)
        if by_split["val"]:
            # Select on val films enhanced the same way: the original val films carry the train
            # shortcut, so choosing by their loss would reward keeping it.
            datasets["select"] = enhanced("val", None)
    datasets = {k: v for k, v in datasets.items() if len(v)}
    if "train" not in datasets or "val" not in datasets:
        raise RuntimeError("training needs non-empty train and val splits")
    return datasets


@dataclass
class TrainingState:
    """The loop's own state. last.pt keeps it under "state" as a plain dict with these keys (the
    ones every checkpoint has had: older checkpoints restore, and newer ones read as before)."""

    epoch: int = 0  # epochs finished
    best_val_loss: float = math.inf  # lowest selection loss so far (val, or enhanced val)
    bad_epochs: int = 0  # epochs since it last fell
    finished: bool = False
    history: list[dict] = field(default_factory=list)  # one row per epoch, as in history.json

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> TrainingState:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})

    def end_epoch(self, select_loss: float, cfg: Config) -> tuple[bool, bool]:
        """Early stopping on the selection loss (val, or enhanced val after the baseline), never
        on test. Returns (improved, stopped early)."""
        improved = select_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, select_loss)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        self.epoch += 1
        stop_early = self.bad_epochs >= cfg.train.early_stopping_patience
        self.finished = self.epoch >= cfg.train.epochs or stop_early
        return improved, stop_early


@dataclass
class Fit:
    """What every epoch works with, built once by `assemble`."""

    cfg: Config
    session: Session
    run_dir: Path
    datasets: dict[str, ImageDataset]
    model: Classifier  # what is validated, saved and evaluated
    net: nn.Module  # what is trained: the model, DDP-wrapped with several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    train_loader: DataLoader


@dataclass
class EpochResult:
    row: dict  # the epoch's history row
    improved: bool  # a new lowest selection loss: best.pt is rewritten
    stop_early: bool  # patience ran out


def restore(
    run_dir: Path, cfg: Config, session: Session, model, optimizer, scheduler
) -> TrainingState:
    """The loop's state: resumed from the newest readable checkpoint, else a fresh start.
    Writes started.json (the driver's watchdog sees the worker got its resources; the tests see
    where a resume came from)."""
    state = TrainingState()
    who = cfg.model.arch
    resume = session.resume_file(run_dir)
    saved = read_checkpoint(resume[0], say, who) if resume is not None else None
    if saved is not None and read_checkpoint(run_dir / BEST, say, who) is None:
        saved = None  # the weights chosen so far are lost: only a fresh start chooses them again
    if saved is not None:
        state = TrainingState.from_dict(restore_training_state(saved, model, optimizer, scheduler))
        if session.is_main:
            say(f"[{who}] resuming after epoch {state.epoch} from the {resume[1]} {resume[2]}")
    if session.is_main:
        atomic_write_json(
            run_dir / STARTED,
            {
                "pid": os.getpid(),
                "time": time.time(),
                "resumed_after_epoch": state.epoch,
                "resumed_from": resume[2] if saved is not None else None,
                "resume_source": resume[1] if saved is not None else None,
            },
        )
    return state


def assemble(
    cfg: Config, session: Session, run_dir: Path, datasets: dict[str, ImageDataset]
) -> tuple[Fit, TrainingState]:
    """Model, optimiser, schedule and loss, resumed from the last checkpoint if there is one."""
    model = make_model(cfg).to(session.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    criterion = make_criterion(cfg, datasets["train"].labels, session.device)
    state = restore(run_dir, cfg, session, model, optimizer, scheduler)
    fit = Fit(
        cfg=cfg,
        session=session,
        run_dir=run_dir,
        datasets=datasets,
        model=model,
        # Wrapped after the resume: DDP starts every rank from the weights rank 0 holds then.
        net=session.distributed(model),
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
        train_loader=loader(datasets["train"], cfg, session, shuffle=True),
    )
    return fit, state


def run_epoch(fit: Fit, state: TrainingState) -> EpochResult:
    """Train one epoch, validate, step the schedule, update early stopping and the history."""
    cfg, device, datasets = fit.cfg, fit.session.device, fit.datasets
    epoch = state.epoch
    started = time.perf_counter()
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout draws: fixed per epoch
    datasets["train"].set_epoch(epoch)
    fit.train_loader.sampler.set_epoch(epoch)
    stats = train_one_epoch(
        fit.net, fit.train_loader, fit.optimizer, fit.criterion, cfg, fit.session
    )
    val = split_metrics(fit.model, datasets["val"], cfg, device)
    select = (
        split_metrics(fit.model, datasets["select"], cfg, device) if "select" in datasets else val
    )
    fit.scheduler.step()
    improved, stop_early = state.end_epoch(select["loss"], cfg)
    row = {
        "epoch": epoch + 1,
        **stats,
        **prefixed(val, "val"),
        "lr": fit.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - started,
    }
    if select is not val:
        row.update(prefixed(select, "select"))
    state.history.append(row)
    return EpochResult(row, improved, stop_early)


def save_epoch(fit: Fit, state: TrainingState, result: EpochResult) -> Path | None:
    """Rank 0: epochs.log, best.pt when improved, last.pt, history.json, the epoch line; returns
    the folder to hand Ray as this epoch's checkpoint (None without Ray checkpoints)."""
    cfg, run_dir, model, row = fit.cfg, fit.run_dir, fit.model, result.row
    with open(run_dir / EPOCH_LOG, "a") as handle:  # append-only: what really ran, resumed or not
        handle.write(f"{row['epoch']} {os.getpid()}\n")
    if result.improved:
        save_classifier(run_dir / BEST, model, cfg, epoch=row["epoch"])
    save_training_state(
        run_dir / LAST,
        model,
        fit.optimizer,
        fit.scheduler,
        state.to_dict(),
        model_meta(cfg, model),
    )
    ray_dir = None
    if fit.session.ray_checkpoints:  # also to Ray's storage_path (shared on a cluster)
        ray_dir = stage_for_ray(run_dir / LAST, run_dir / RAY_CHECKPOINT, state.epoch)
    atomic_write_json(run_dir / HISTORY, state.history)
    stopped_early = result.stop_early and state.epoch < cfg.train.epochs
    say(epoch_line(row, cfg, result.improved, stopped_early))
    return ray_dir


def epoch_line(row: dict, cfg: Config, improved: bool, stopped_early: bool) -> str:
    parts = [
        f"[{cfg.model.arch}] epoch {row['epoch']}/{cfg.train.epochs}",
        f"train_loss {row['train_loss']:.4f}",
        f"train_acc {row['train_accuracy']:.3f}",
        f"val_loss {row['val_loss']:.4f}",
        f"val_acc {row['val_accuracy']:.3f}",
    ]
    if "select_loss" in row:
        parts += [
            f"select_loss {row['select_loss']:.4f}",
            f"select_acc {row['select_accuracy']:.3f}",
        ]
    note = (" (best)" if improved else "") + (" - early stop" if stopped_early else "")
    return "  ".join(parts) + f"  {row['seconds']:.1f}s{note}"


def record_reads(run_dir: Path, session: Session, sampler: EpochShuffle, epoch: int) -> None:
    """reads-rank{r}.json: which training films this rank reads in the first epoch it runs, and
    where it runs. With several workers the ranks' parts are disjoint; the file shows it."""
    node = ""
    if session.in_ray:
        import ray

        node = ray.get_runtime_context().get_node_id()
    sampler.set_epoch(epoch)
    atomic_write_json(
        run_dir / f"reads-rank{session.rank}.json",
        {
            "rank": session.rank,
            "world_size": session.world_size,
            "node_id": node,
            "pid": os.getpid(),
            "epoch": epoch + 1,
            "films": sorted(int(i) for i in sampler),
            "of": sampler.n,
        },
    )


def final_evaluation(fit: Fit) -> dict:
    """Reload the weights chosen on val (never test) and evaluate every original split."""
    cfg, model = fit.cfg, fit.model
    best = torch.load(fit.run_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    flat, results = evaluate_splits(
        model, fit.datasets, cfg, fit.session.device, fit.run_dir, best_epoch=best["epoch"]
    )
    chosen_on = "enhanced val" if "select" in fit.datasets else "val"
    say(
        f"[{cfg.model.arch}] best epoch {best['epoch']} (lowest {chosen_on} loss)\n"
        + format_table(results)
    )
    return flat


def train_func(loop_config: dict) -> None:
    """Ray Train's entry point (also called directly in-process): fit one architecture with
    the fields of `LoopConfig`, resuming after the last finished epoch. With `train_shards` the
    model trains on the enhanced films and is still validated and tested on the originals."""
    loop = LoopConfig(**loop_config)
    cfg = Config.model_validate(loop.config)
    quiet_ray_train_logs()
    session = Session.detect(loop.ray_checkpoints, loop.in_process)
    if session.in_ray and loop.threads:
        torch.set_num_threads(int(loop.threads))  # workers side by side share the cores
    torch.manual_seed(cfg.seed)
    datasets = build_datasets(cfg, ScanResult.load(loop.records), loop.train_shards)
    fit, state = assemble(cfg, session, Path(loop.run_dir), datasets)
    if not state.finished:
        record_reads(fit.run_dir, session, fit.train_loader.sampler, state.epoch)
        for name, ds in datasets.items():
            ds.preload(label=f"{cfg.model.arch} {name}" if session.is_main else "")

    while not state.finished:
        result = run_epoch(fit, state)
        ray_dir = save_epoch(fit, state, result) if session.is_main else None
        numbers = {k: v for k, v in result.row.items() if isinstance(v, (int, float))}
        session.report(numbers, ray_dir)

    final = final_evaluation(fit) if session.is_main else {}
    session.report({"final": 1, **final})


# ---------------------------------------------------------------------------------------------
# Driver side


def resolve_use_gpu(cfg: Config) -> bool:
    """resources.use_gpu with `auto` decided from the cluster (see resources.decide_gpu)."""
    import ray

    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    return decide_gpu(cfg.resources.use_gpu, cluster)[0]


def run_training(
    cfg: Config,
    records_path: Path,
    run_dir: Path,
    name: str,
    train_shards: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Fit one architecture with Ray Train (num_workers=0: in this process). Returns metrics.json.
    Safe to call from several threads at once: each call is its own TorchTrainer. `threads` caps
    each worker's torch threads (trainers sharing a machine); None leaves torch's default."""
    run_dir.mkdir(parents=True, exist_ok=True)
    workers = cfg.resources.num_workers
    # Every path absolute: a Ray Train worker runs in a folder of its own.
    loop = LoopConfig(
        config=cfg.with_absolute_paths().model_dump(mode="json"),
        records=str(Path(records_path).resolve()),
        run_dir=str(run_dir.resolve()),
        ray_checkpoints=workers > 0,
        train_shards=str(Path(train_shards).resolve()) if train_shards else None,
        threads=threads,
        in_process=workers == 0,
    )
    if workers == 0:
        # In this process, on whatever device it has: the same loop without a Train controller
        # (inside a Tune trial, which already holds its CPU or GPU).
        train_func(asdict(loop))
        return json.loads((run_dir / METRICS).read_text())["flat"]
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    (run_dir / STARTED).unlink(missing_ok=True)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=asdict(loop),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.storage_path(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with _TRAINERS.watch(name, run_dir, cfg, use_gpu):
        result = trainer.fit()
    metrics_file = run_dir / METRICS
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())["flat"]
    # Rank 0 ran on another node: its final report carries the metrics.
    return {k: v for k, v in result.metrics.items() if k != "final"}


class _TrainerWatch:
    """The trainers this driver runs, and a watchdog for each: a trainer whose workers have not
    started within `resources.stall_timeout_s`, while none of this driver's other trainers is
    running (whose end would free resources), waits for something the cluster does not have."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, Path] = {}

    def _started(self, run_dir: Path) -> bool:
        return (run_dir / STARTED).is_file()

    @contextmanager
    def watch(self, name: str, run_dir: Path, cfg: Config, use_gpu: bool):
        import ray

        r = cfg.resources
        request = trainer_request(r.num_workers, r.cpus_per_worker, r.gpus_per_worker, use_gpu)

        def stalled() -> bool:
            with self._lock:
                others = [d for n, d in self._running.items() if n != name]
            return not self._started(run_dir) and not any(self._started(d) for d in others)

        def describe(waited: float) -> str:
            return waiting_message(
                f"training {name} ({r.num_workers} Ray Train worker(s))",
                waited,
                request,
                ray.cluster_resources(),
                ray.available_resources(),
                "give the cluster what one trainer asks for (`ray start --head --num-cpus N`, "
                "GPU nodes), or ask for less (resources.cpus_per_worker, resources.num_workers, "
                "resources.use_gpu=false), or train "
                "in the driver (resources.num_workers=0)",
            )

        with self._lock:
            self._running[name] = run_dir
        try:
            with Watchdog(f"train {name}", r.stall_timeout_s, describe, stalled=stalled):
                yield
        finally:
            with self._lock:
                self._running.pop(name, None)


_TRAINERS = _TrainerWatch()
