"""Train and evaluate one architecture: a `train_func(config)` that runs in-process, on one Ray
Train worker or on many (DDP), and resumes from its last checkpoint after a crash.

Read top to bottom: films -> model -> optimiser -> resume -> epochs (train, validate, checkpoint,
early stop) -> reload the best weights (chosen on val, never on test) -> evaluate every split.

The films stream (cycle.data.films): on Ray Train workers from Ray Data (`get_dataset_shard`,
train split across the workers, the other splits read by rank 0 alone), in-process from disk, in
the same order; a worker holds the batches in flight and its shuffle buffer, never a split.
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
from cycle.data.films import FilmSet, FilmStreams, shuffled_rows, to_tensors
from cycle.data.transforms import augment_from_config, preprocess_from_config
from cycle.evaluate import (
    EVAL_SPLITS,
    autocast,
    evaluate_splits,
    localize_splits,
    panel_records,
    split_metrics,
)
from cycle.io import atomic_write_json
from cycle.layout import (
    BEST,
    EPOCH_LOG,
    HISTORY,
    LAST,
    LOCALIZED,
    METRICS,
    RAY_CHECKPOINT,
    RAY_FINAL,
    STARTED,
    predictions,
)
from cycle.metrics import format_table, prefixed
from cycle.models import Classifier, build_model
from cycle.ray_checkpoints import restore_folder, run_checkpoints, stage_files
from cycle.resources import (
    arrow_returns_freed_memory,
    decide_gpu,
    peak_rss_mb,
    release_freed_memory,
    trainer_request,
    waiting_message,
)
from cycle.watchdog import Watchdog

# The stage's files are named in cycle.layout: BEST (the weights with the lowest selection loss so
# far), LAST (model, optimiser, scheduler, epoch, early-stopping state, history), STARTED. Ray's
# checkpoint of an epoch holds both weights files and RAY_EPOCH (cycle.ray_checkpoints): a stage
# restores from Ray's storage alone, on any node.
#
# Each epoch's report to Ray carries SELECTION: the loss the epoch is chosen by (val, or the
# enhanced val films after the baseline); Ray keeps the best checkpoint by it, and the newest.
SELECTION = "selection_loss"


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

    def resume_from(self, run_dir: Path) -> tuple[Path, str, str] | None:
        """(folder holding last.pt and the best.pt of its epoch, where it came from, its location
        there): the newest complete checkpoint in Ray's storage (a restarted worker, maybe on
        another node with none of the stage's files; see cycle.ray_checkpoints), unless this
        node's own last.pt is newer."""
        if self.in_ray and self.ray_checkpoints:
            stored = run_checkpoints()
            history = run_dir / HISTORY
            local_epoch = (
                len(json.loads(history.read_text()))
                if (run_dir / LAST).is_file() and history.is_file()
                else -1
            )
            if stored and stored[-1].epoch >= local_epoch:
                folder = restore_folder(stored[-1], stored)
                return folder, "Ray storage checkpoint", f"{stored[-1].path}/{LAST}"
        path = run_dir / LAST
        return (run_dir, "local checkpoint", str(path)) if path.is_file() else None

    def distributed(self, model: nn.Module) -> nn.Module:
        """DDP across the Ray Train workers; the model itself with one worker or none."""
        if not (self.in_ray and self.world_size > 1):
            return model
        import ray.train.torch
        import torch.distributed as dist

        say(f"DDP: rank {self.rank} of {self.world_size} workers ({dist.get_backend()})")
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
# Films


def film_sets(records: str, train_shards: str | None, seed: int) -> dict[str, FilmSet]:
    """train, val, test, test_cf from the records. With shards, train is the enhanced films and
    "select" the enhanced val films (what the epoch is chosen on); val, test and test_cf stay the
    original films. Empty sets are left out."""
    sets = {split: FilmSet.originals(records, split, seed) for split in ("train", *EVAL_SPLITS)}
    if train_shards:
        sets["train"] = FilmSet.enhanced(train_shards, "train")
        # Select on val films enhanced the same way: the original val films carry the train
        # shortcut, so choosing by their loss would reward keeping it.
        sets["select"] = FilmSet.enhanced(train_shards, "val")
    sets = {name: films for name, films in sets.items() if len(films)}
    if "train" not in sets or "val" not in sets:
        raise RuntimeError("training needs non-empty train and val splits")
    return sets


# ---------------------------------------------------------------------------------------------
# Pieces


def stage_for_ray(run_dir: Path, epoch: int, improved: bool) -> Path:
    """The folder Ray copies to storage_path for an epoch: last.pt, and best.pt when the epoch
    chose new weights (Ray keeps that checkpoint by its selection loss), hard-linked in, and
    RAY_EPOCH, which says the epoch and what makes the checkpoint complete."""
    names = (LAST, BEST) if improved else (LAST,)
    return stage_files(run_dir / RAY_CHECKPOINT, run_dir, names, epoch=epoch)


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


def make_criterion(cfg: Config, counts: tuple[int, int], device: torch.device) -> nn.Module:
    """Cross-entropy, with inverse-frequency class weights unless train.class_weights=none."""
    if cfg.train.class_weights == "none":
        return nn.CrossEntropyLoss()
    counts = np.asarray(counts, dtype=np.float64)
    weights = torch.tensor(counts.sum() / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weights.to(device))


def training_batches(films: FilmStreams, cfg: Config, epoch: int, rank: int):
    """(images, labels, indices) of this rank's training films for one epoch: its rows through
    the shuffle buffer (seeded by seed, epoch and rank), augmented (seeded by seed, epoch and
    film), center-cropped, normalised."""
    rng = np.random.default_rng([cfg.seed, epoch, rank, 7])
    rows = shuffled_rows(films.batches("train"), cfg.data.shuffle_buffer, rng)
    preprocess = preprocess_from_config(cfg.data)
    augment = augment_from_config(cfg.train.augment)
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == cfg.train.batch_size:
            yield to_tensors(chunk, preprocess, augment, cfg.seed, epoch)
            chunk = []
    if chunk:
        yield to_tensors(chunk, preprocess, augment, cfg.seed, epoch)


def train_one_epoch(fit: Fit, epoch: int) -> tuple[dict[str, float], list[int]]:
    """One pass over this rank's part; returns its numbers and the films it read."""
    cfg, device, model = fit.cfg, fit.session.device, fit.net
    model.train()
    total_loss, correct, seen, read = 0.0, 0, 0, []
    batches = training_batches(fit.films, cfg, epoch, fit.session.rank)
    for step, (images, labels, indices) in enumerate(batches):
        if cfg.train.max_steps_per_epoch and step >= cfg.train.max_steps_per_epoch:
            batches.close()  # the rest of the epoch is not read
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(images).float()
        loss = fit.criterion(logits, labels)
        fit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fit.optimizer.step()
        faults.reached("train:step")
        release_freed_memory()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        read.extend(indices)
    stats = {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
    return stats, read


# ---------------------------------------------------------------------------------------------
# The loop, step by step


@dataclass
class LoopConfig:
    """What `train_func` needs besides the Config. Plain values: Ray ships it to each worker as
    `train_loop_config` (a dict of these fields)."""

    config: dict  # the Config, dumped, every path absolute
    films: dict  # name -> FilmSet fields: what each set is (no film, no file list)
    run_dir: str  # where last.pt, best.pt, history.json, metrics.json go
    ray_checkpoints: bool = False  # also hand each epoch's checkpoint to Ray's storage_path
    threads: int | None = None  # torch threads per Ray worker (trainers sharing a machine)
    in_process: bool = False  # called directly, not by Ray Train (e.g. inside a Tune trial)
    # After training, where the CAMs of the chosen weights look on test and val:
    # {"lung_model": path, "seed": the job's seed (the same panel and probe donors every cycle)}
    localize: dict | None = None


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
    films: FilmStreams
    model: Classifier  # what is validated, saved and evaluated
    net: nn.Module  # what is trained: the model, DDP-wrapped with several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module


@dataclass
class EpochResult:
    row: dict  # the epoch's history row (on rank 0; the others' rows carry no val numbers)
    improved: bool  # a new lowest selection loss: best.pt is rewritten
    stop_early: bool  # patience ran out
    read: list[int]  # the training films this rank read


def restore(
    run_dir: Path, cfg: Config, session: Session, model, optimizer, scheduler
) -> TrainingState:
    """The loop's state: resumed from the newest readable checkpoint, else a fresh start. A
    checkpoint from Ray's storage brings its best.pt along (this node may have none). Writes
    started.json (the driver's watchdog sees the worker got its resources; the tests see where
    a resume came from)."""
    state = TrainingState()
    who = cfg.model.arch
    resume = session.resume_from(run_dir)
    saved = read_checkpoint(resume[0] / LAST, say, who) if resume is not None else None
    if saved is not None and resume[0] != run_dir and (resume[0] / BEST).is_file():
        shutil.copyfile(resume[0] / BEST, run_dir / f".{BEST}.restored")
        os.replace(run_dir / f".{BEST}.restored", run_dir / BEST)
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
    cfg: Config, session: Session, run_dir: Path, films: FilmStreams
) -> tuple[Fit, TrainingState]:
    """Model, optimiser, schedule and loss, resumed from the last checkpoint if there is one."""
    model = make_model(cfg).to(session.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    criterion = make_criterion(cfg, films.sets["train"].label_counts(), session.device)
    state = restore(run_dir, cfg, session, model, optimizer, scheduler)
    fit = Fit(
        cfg=cfg,
        session=session,
        run_dir=run_dir,
        films=films,
        model=model,
        # Wrapped after the resume: DDP starts every rank from the weights rank 0 holds then.
        net=session.distributed(model),
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion,
    )
    return fit, state


def run_epoch(fit: Fit, state: TrainingState) -> EpochResult:
    """Train one epoch; rank 0 validates (the others wait at the report); step the schedule;
    update early stopping and the history."""
    cfg, films = fit.cfg, fit.films
    epoch = state.epoch
    started = time.perf_counter()
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout draws: fixed per epoch
    stats, read = train_one_epoch(fit, epoch)
    fit.scheduler.step()
    if not fit.session.is_main:
        state.epoch += 1  # rank 0 decides the rest; its report says when to stop
        return EpochResult({"epoch": epoch + 1, **stats}, False, False, read)
    device = fit.session.device
    val = split_metrics(fit.model, films, "val", cfg, device)
    select = split_metrics(fit.model, films, "select", cfg, device) if "select" in films else val
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
    return EpochResult(row, improved, stop_early, read)


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
    if fit.session.ray_checkpoints:
        ray_dir = stage_for_ray(run_dir, state.epoch, result.improved)
    atomic_write_json(run_dir / HISTORY, state.history)
    stopped_early = result.stop_early and state.epoch < cfg.train.epochs
    say(epoch_line(row, cfg, result.improved, stopped_early))
    return ray_dir


def epoch_report(fit: Fit, state: TrainingState, result: EpochResult) -> dict:
    """What every rank reports for an epoch: rank 0's numbers, with the selection loss Ray keeps
    the best checkpoint by, and whether the loop goes on (the other ranks follow rank 0)."""
    numbers = {k: v for k, v in result.row.items() if isinstance(v, (int, float))}
    if fit.session.is_main:
        numbers[SELECTION] = result.row.get("select_loss", result.row.get("val_loss"))
        numbers["finished"] = int(state.finished)
    return numbers


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


def record_reads(fit: Fit, epoch: int, read: list[int]) -> None:
    """reads-rank{r}.json: which training films this rank read in the first epoch it ran, and
    where it ran. With several workers the ranks' parts are disjoint; the file shows it."""
    session = fit.session
    node = _node_id(session)
    atomic_write_json(
        fit.run_dir / f"reads-rank{session.rank}.json",
        {
            "rank": session.rank,
            "world_size": session.world_size,
            "node_id": node,
            "pid": os.getpid(),
            "epoch": epoch + 1,
            "films": sorted(read),
            "of": len(fit.films.sets["train"]),
        },
    )


def final_evaluation(fit: Fit) -> dict:
    """Reload the weights chosen on val (never test) and evaluate every original split."""
    cfg, model = fit.cfg, fit.model
    best = torch.load(fit.run_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    flat, results = evaluate_splits(
        model, fit.films, cfg, fit.session.device, fit.run_dir, best_epoch=best["epoch"]
    )
    chosen_on = "enhanced val" if "select" in fit.films else "val"
    say(
        f"[{cfg.model.arch}] best epoch {best['epoch']} (lowest {chosen_on} loss)\n"
        + format_table(results)
    )
    return flat


def localize_best(fit: Fit, spec: dict) -> list[str]:
    """Where the chosen weights' CAMs look on test (with the CAM panel) and val, with the probe:
    measured here, where the model and its GPU are (cycle.evaluate.localize), left beside the
    weights for the evaluation stage. Returns the files written."""
    cfg, started = fit.cfg, time.perf_counter()
    records = {s: fit.films.sets[s].records() if s in fit.films else [] for s in ("test", "val")}
    splits = {
        "test": (records["test"], panel_records(records["test"], spec["seed"])),
        "val": (records["val"], ()),
    }
    found = localize_splits(
        fit.run_dir / BEST,
        splits,
        cam_method=cfg.cam.method,
        lung_model_path=spec["lung_model"],
        seed=spec["seed"],
        cam_depth=cfg.cam.depth,
        probe_dilate_px=cfg.enhance.dilate_px,
    )
    seconds = time.perf_counter() - started
    say(
        f"[{cfg.model.arch}] CAMs, lung masks and the probe on {len(records['test'])} test and "
        f"{len(records['val'])} val films in {seconds:.1f}s"
    )
    names = [name for split, result in found.items() for name in result.save_as(fit.run_dir, split)]
    # Where it ran: a training worker (its node's GPU), never the driver.
    atomic_write_json(
        fit.run_dir / LOCALIZED,
        {
            "pid": os.getpid(),
            "node_id": _node_id(fit.session),
            "seconds": seconds,
            "films": len(records["test"]) + len(records["val"]),
        },
    )
    return [*names, LOCALIZED]


def _node_id(session: Session) -> str:
    if not session.in_ray:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id()


def final_files(fit: Fit, localized: list[str]) -> list[str]:
    """What a stage leaves for the stages after it, handed to Ray with the final report: the
    driver takes them from Ray's storage when rank 0 ran on a node whose disk it cannot see."""
    names = [BEST, METRICS, HISTORY, EPOCH_LOG, STARTED, *localized]
    return names + [predictions(split) for split in EVAL_SPLITS if split in fit.films]


def train_func(loop_config: dict) -> None:
    """Ray Train's entry point (also called directly in-process): fit one architecture with
    the fields of `LoopConfig`, resuming after the last finished epoch. After the baseline the
    model trains on enhanced films and is still validated and tested on the originals."""
    loop = LoopConfig(**loop_config)
    cfg = Config.model_validate(loop.config)
    quiet_ray_train_logs()
    arrow_returns_freed_memory()
    session = Session.detect(loop.ray_checkpoints, loop.in_process)
    if session.in_ray and loop.threads:
        torch.set_num_threads(int(loop.threads))  # workers side by side share the cores
    torch.manual_seed(cfg.seed)
    films = FilmStreams(
        {k: FilmSet(**v) for k, v in loop.films.items()}, cfg.data, from_ray=session.in_ray
    )
    fit, state = assemble(cfg, session, Path(loop.run_dir), films)
    first = True
    while not state.finished:
        result = run_epoch(fit, state)
        if first:
            record_reads(fit, state.epoch - 1, result.read)
            first = False
        ray_dir = save_epoch(fit, state, result) if session.is_main else None
        report = epoch_report(fit, state, result)
        session.report(report, ray_dir)
        state.finished = _finished_everywhere(session, state.finished)

    final = final_evaluation(fit) if session.is_main else {}
    localized = localize_best(fit, loop.localize) if session.is_main and loop.localize else []
    # What this worker held at its peak (bench/scale_bench.py reads it: memory must not grow with
    # the data set).
    atomic_write_json(
        fit.run_dir / f"worker-rank{session.rank}.json",
        {"pid": os.getpid(), "node_id": _node_id(session), "peak_rss_mb": peak_rss_mb()},
    )
    final_dir = None
    if session.is_main and session.ray_checkpoints:
        final_dir = stage_files(fit.run_dir / RAY_FINAL, fit.run_dir, final_files(fit, localized))
    session.report({"final": 1, SELECTION: state.best_val_loss, **final}, final_dir)


def _finished_everywhere(session: Session, finished: bool) -> bool:
    """Rank 0 decides when training ends (early stopping reads its val loss); with DDP the other
    ranks learn it here, so that all stop after the same epoch."""
    if not (session.in_ray and session.world_size > 1):
        return finished
    import torch.distributed as dist

    flag = torch.tensor([int(finished)], dtype=torch.int64, device=session.device)
    dist.broadcast(flag, src=0)  # on the backend's device: NCCL takes CUDA tensors only
    return bool(flag.item())


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
    localize: dict | None = None,
) -> dict:
    """Fit one architecture with Ray Train (num_workers=0: in this process). Returns metrics.json.
    Safe to call from several threads at once: each call is its own TorchTrainer. `threads` caps
    each worker's torch threads (trainers sharing a machine); None leaves torch's default.
    `localize` (LoopConfig's): also measure the chosen weights' CAMs where they trained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    workers = cfg.resources.num_workers
    sets = film_sets(
        str(Path(records_path).resolve()),
        str(Path(train_shards).resolve()) if train_shards else None,
        cfg.seed,
    )
    # Every path absolute: a Ray Train worker runs in a folder of its own.
    loop = LoopConfig(
        config=cfg.with_absolute_paths().model_dump(mode="json"),
        films={name: films.to_dict() for name, films in sets.items()},
        run_dir=str(run_dir.resolve()),
        ray_checkpoints=workers > 0,
        threads=threads,
        in_process=workers == 0,
        localize=localize,
    )
    if workers == 0:
        # In this process, on whatever device it has: the same loop without a Train controller
        # (inside a Tune trial, which already holds its CPU or GPU).
        train_func(asdict(loop))
        return json.loads((run_dir / METRICS).read_text())["flat"]
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    preprocess = preprocess_from_config(cfg.data)
    (run_dir / STARTED).unlink(missing_ok=True)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=asdict(loop),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # Each set's rows from Ray Data (decoded by the worker, or by Ray Data tasks across the
        # cluster); train split between the workers, the rest read by rank 0. In order: the same
        # seed gives the same answer.
        datasets={
            name: films.ray_dataset(
                preprocess,
                cfg.data.max_image_pixels,
                cfg.data.ingest_tasks,
                decode=cfg.data.decode == "ray_data",
            )
            for name, films in sets.items()
        },
        # One worker reads train whole, in its own process (no split coordinator to start).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if workers > 1 else [],
            execution_options=ExecutionOptions(preserve_order=True),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.storage_path(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            # The best epoch's checkpoint by the selection loss, and always the newest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=SELECTION,
                checkpoint_score_order="min",
            ),
        ),
    )
    with _TRAINERS.watch(name, run_dir, cfg, use_gpu):
        result = trainer.fit()
    if not (run_dir / METRICS).is_file():
        # Rank 0 ran on a node whose disk this one cannot see: the stage's files from storage.
        result.checkpoint.to_directory(str(run_dir))
    return json.loads((run_dir / METRICS).read_text())["flat"]


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
