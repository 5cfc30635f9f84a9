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
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cycle import faults
from cycle.checkpoint import model_meta, save_classifier
from cycle.config import Config
from cycle.data.dataset import EpochShuffle, ImageDataset
from cycle.data.records import ScanResult, records_of
from cycle.data.transforms import augment_from_config, preprocess_from_config
from cycle.io import atomic_torch_save, atomic_write_json, atomic_write_text
from cycle.metrics import classification_metrics, confusion_matrix, format_table, prefixed
from cycle.models import Classifier, build_model

LAST = "last.pt"  # model, optimiser, scheduler, epoch, early-stopping state, history
BEST = "best.pt"  # model weights with the lowest val loss so far
STARTED = "started.json"  # written when a worker begins: the driver's watchdog knows it got resources
RAY_EPOCH = "epoch.json"  # beside last.pt in Ray's checkpoint: which epoch it holds
EPOCH_LOG = "epochs.log"  # one line per epoch executed (history.json is rebuilt from the checkpoint)
EVAL_SPLITS = ("val", "test", "test_cf")


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
                return cls(True, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                           ray_checkpoints)
            # Not inside trainer.fit() (RuntimeError), or inside a Tune trial (DeprecationWarning).
            except (ImportError, RuntimeError, DeprecationWarning):
                pass
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(False, 0, 1, device, False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume_file(self, run_dir: Path) -> tuple[Path, str] | None:
        """(checkpoint, where it came from): Ray's checkpoint on shared storage (a restarted
        worker, maybe on another node), unless this node's own last.pt is newer (Ray registers a
        checkpoint a moment after the epoch ends: a worker killed in between would redo it)."""
        path = run_dir / LAST
        if self.in_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                folder = Path(checkpoint.to_directory())
                ray_epoch = json.loads((folder / RAY_EPOCH).read_text())["epoch"] if (folder / RAY_EPOCH).is_file() else math.inf
                history = run_dir / "history.json"
                local_epoch = len(json.loads(history.read_text())) if path.is_file() and history.is_file() else -1
                if (folder / LAST).is_file() and ray_epoch >= local_epoch:
                    return folder / LAST, "Ray storage checkpoint"
        return (path, "local checkpoint") if path.is_file() else None

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
    atomic_write_json(ray_dir / RAY_EPOCH, {"epoch": epoch})
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


def say(message: str) -> None:
    """Progress to stdout, once: Ray Train V2 patches `print` into a logger that, beside Ray's own
    stdout capture, shows every line twice in the driver's log."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


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
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)
    optimizer_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}[t.optimizer]
    return optimizer_cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    if cfg.train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def class_weights(cfg: Config, labels: np.ndarray) -> torch.Tensor | None:
    if cfg.train.class_weights == "none":
        return None
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.tensor(len(labels) / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32)


def loader(dataset: ImageDataset, cfg: Config, session: Session, shuffle: bool) -> DataLoader:
    sampler = EpochShuffle(len(dataset), cfg.seed, session.rank, session.world_size, shuffle=shuffle)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size if shuffle else max(cfg.train.batch_size, 64),
        sampler=sampler,
        num_workers=cfg.data.loader_workers,
        pin_memory=session.device.type == "cuda",
        drop_last=False,
    )


def autocast(cfg: Config, device: torch.device):
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device) -> dict[str, np.ndarray]:
    """Per-image P(PNEUMONIA) and loss over a whole split, in record order (no augmentation)."""
    was_training = model.training
    model.eval()
    probs = np.zeros(len(dataset), np.float64)
    losses = np.zeros(len(dataset), np.float64)
    plain = DataLoader(dataset, batch_size=max(cfg.train.batch_size, 64), shuffle=False,
                       num_workers=cfg.data.loader_workers)
    for images, labels, index in plain:
        with autocast(cfg, device):
            logits = model(images.to(device, non_blocking=True)).float()
        labels = labels.to(device)
        losses[index.numpy()] = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
        probs[index.numpy()] = logits.softmax(dim=1)[:, 1].cpu().numpy()
    model.train(was_training)
    return {"probs": probs, "losses": losses, "labels": dataset.labels}


def evaluate(model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device) -> dict[str, float]:
    out = predict(model, dataset, cfg, device)
    return classification_metrics(out["labels"], out["probs"], out["losses"])


def train_one_epoch(model, data, optimizer, criterion, cfg: Config, session: Session) -> dict[str, float]:
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


def load_checkpoint(path: Path, arch: str) -> dict | None:
    """A training checkpoint, or None (with a message) when it is truncated or unreadable: the
    stage then starts over instead of ending in a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, empty file: all mean "not a checkpoint"
        say(f"[{arch}] {path} is unreadable ({type(err).__name__}: {err}); starting this stage over")
        return None


# ---------------------------------------------------------------------------------------------
# The loop


def train_func(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: {"config": Config dump, "records": path, "run_dir": path,
    "ray_checkpoints": bool, "train_shards": optional shard dir}. With `train_shards` the model
    trains on the enhanced films of a shard build and is still validated and tested on the
    original films. Writes run_dir/{last.pt, best.pt, history.json, metrics.json}."""
    cfg = Config.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    quiet_ray_train_logs()
    session = Session.detect(bool(loop_config.get("ray_checkpoints", False)), bool(loop_config.get("in_process")))
    if session.in_ray and loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))  # workers side by side share the cores
    scan = ScanResult.load(loop_config["records"])
    torch.manual_seed(cfg.seed)

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
    if loop_config.get("train_shards"):
        from cycle.data.shards import load_shards

        shard_records, films, _ = load_shards(loop_config["train_shards"])
        by_split = {s: [i for i, r in enumerate(shard_records) if r.split == s] for s in ("train", "val")}
        datasets["train"] = ImageDataset([shard_records[i] for i in by_split["train"]], preprocess, augment,
                                         seed=cfg.seed, resized=[films[i] for i in by_split["train"]])
        if by_split["val"]:
            # Select on val films enhanced the same way: the original val films carry the train
            # shortcut, so choosing by their loss would reward keeping it.
            datasets["select"] = ImageDataset([shard_records[i] for i in by_split["val"]], preprocess, None,
                                              seed=cfg.seed, resized=[films[i] for i in by_split["val"]])
    datasets = {k: v for k, v in datasets.items() if len(v)}
    if "train" not in datasets or "val" not in datasets:
        raise RuntimeError("training needs non-empty train and val splits")

    model = make_model(cfg).to(session.device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    weights = class_weights(cfg, datasets["train"].labels)
    criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(session.device))

    state = {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0, "finished": False, "history": []}
    resume = session.resume_file(run_dir)
    saved = load_checkpoint(resume[0], cfg.model.arch) if resume is not None else None
    if saved is not None and load_checkpoint(run_dir / BEST, cfg.model.arch) is None:
        saved = None  # the weights chosen so far are lost: only a fresh start chooses them again
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        if session.is_main:
            say(f"[{cfg.model.arch}] resuming after epoch {state['epoch']} from the {resume[1]} {resume[0]}")
    if session.is_main:  # also says where a resume came from (the tests check it)
        atomic_write_json(run_dir / STARTED, {
            "pid": os.getpid(), "time": time.time(), "resumed_after_epoch": state["epoch"],
            "resumed_from": str(resume[0]) if saved is not None else None,
            "resume_source": resume[1] if saved is not None else None})

    net = model
    if session.in_ray and session.world_size > 1:
        import ray.train.torch

        net = ray.train.torch.prepare_model(model, move_to_device=False)

    train_loader = loader(datasets["train"], cfg, session, shuffle=True)
    if not state["finished"]:
        for name, ds in datasets.items():
            ds.preload(label=f"{cfg.model.arch} {name}" if session.is_main else "")

    while not state["finished"]:
        epoch = state["epoch"]
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout draws: fixed per epoch
        datasets["train"].set_epoch(epoch)
        train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(net, train_loader, optimizer, criterion, cfg, session)
        val = evaluate(model, datasets["val"], cfg, session.device)
        select = evaluate(model, datasets["select"], cfg, session.device) if "select" in datasets else val
        scheduler.step()

        improved = select["loss"] < state["best_val_loss"]
        state["best_val_loss"] = min(state["best_val_loss"], select["loss"])
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch + 1
        stop_early = state["bad_epochs"] >= cfg.train.early_stopping_patience
        state["finished"] = state["epoch"] >= cfg.train.epochs or stop_early
        row = {"epoch": epoch + 1, **stats, **prefixed(val, "val"), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - started}
        if select is not val:
            row.update(prefixed(select, "select"))
        state["history"].append(row)

        ray_dir = None
        if session.is_main:
            with open(run_dir / EPOCH_LOG, "a") as handle:  # append-only: what really ran, resumed or not
                handle.write(f"{epoch + 1} {os.getpid()}\n")
            if improved:
                save_classifier(run_dir / BEST, model, cfg, epoch=epoch + 1)
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": state,
                "meta": model_meta(cfg, model),
            }
            atomic_torch_save(run_dir / LAST, checkpoint)
            if session.ray_checkpoints:  # also to Ray's storage_path (shared on a cluster)
                ray_dir = stage_for_ray(run_dir / LAST, run_dir / "ray_checkpoint", state["epoch"])
            atomic_write_json(run_dir / "history.json", state["history"])
            note = " (best)" if improved else ""
            note += " - early stop" if stop_early and state["epoch"] < cfg.train.epochs else ""
            say(
                f"[{cfg.model.arch}] epoch {epoch + 1}/{cfg.train.epochs}  train_loss {stats['train_loss']:.4f}  "
                f"train_acc {stats['train_accuracy']:.3f}  val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.3f}  "
                + (f"select_loss {select['loss']:.4f}  select_acc {select['accuracy']:.3f}  " if select is not val else "")
                + f"{row['seconds']:.1f}s{note}"
            )
        session.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, ray_dir)

    final = final_evaluation(model, datasets, cfg, session.device, run_dir) if session.is_main else {}
    session.report({"final": 1, **final})


def final_evaluation(model: Classifier, datasets: dict, cfg: Config, device: torch.device, run_dir: Path) -> dict:
    """Reload the weights chosen on val and evaluate every split; write metrics and predictions."""
    best = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    results, flat = {}, {"best_epoch": best["epoch"]}
    for split in EVAL_SPLITS:
        if split not in datasets:
            continue
        out = predict(model, datasets[split], cfg, device)
        metrics = classification_metrics(out["labels"], out["probs"], out["losses"])
        metrics["confusion_matrix"] = confusion_matrix(out["labels"], out["probs"] >= 0.5).tolist()
        results[split] = metrics
        flat.update(prefixed(metrics, split))
        lines = ["path,label,prob_pneumonia"] + [
            f"{r.path},{r.label},{p:.6f}" for r, p in zip(datasets[split].records, out["probs"])
        ]
        atomic_write_text(run_dir / f"predictions_{split}.csv", "\n".join(lines) + "\n")
    atomic_write_json(run_dir / "metrics.json", {"flat": flat, "splits": results})
    chosen_on = "enhanced val" if "select" in datasets else "val"
    say(f"[{cfg.model.arch}] best epoch {best['epoch']} (lowest {chosen_on} loss)\n" + format_table(results))
    return flat


# ---------------------------------------------------------------------------------------------
# Driver side


def resolve_use_gpu(cfg: Config) -> bool:
    if cfg.resources.use_gpu != "auto":
        return bool(cfg.resources.use_gpu)
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def run_training(cfg: Config, records_path: Path, run_dir: Path, name: str, train_shards: Path | None = None,
                 threads: int | None = None) -> dict:
    """Fit one architecture with Ray Train (num_workers=0: in this process). Returns metrics.json.
    Safe to call from several threads at once: each call is its own TorchTrainer. `threads` caps
    each worker's torch threads (trainers sharing a machine); None leaves torch's default."""
    run_dir.mkdir(parents=True, exist_ok=True)
    workers = cfg.resources.num_workers
    # Every path absolute: a Ray Train worker runs in a folder of its own.
    loop_config = {
        "config": cfg.with_absolute_paths().model_dump(mode="json"),
        "records": str(Path(records_path).resolve()),
        "run_dir": str(run_dir.resolve()),
        "ray_checkpoints": workers > 0,
        "train_shards": str(Path(train_shards).resolve()) if train_shards else None,
        "threads": threads,
    }
    if workers == 0:
        # In this process, on whatever device it has: the same loop without a Train controller
        # (inside a Tune trial, which already holds its CPU or GPU).
        train_func({**loop_config, "in_process": True})
        return json.loads((run_dir / "metrics.json").read_text())["flat"]
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    (run_dir / STARTED).unlink(missing_ok=True)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
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
    metrics_file = run_dir / "metrics.json"
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

        from cycle.resources import trainer_request, waiting_message
        from cycle.watchdog import Watchdog

        r = cfg.resources
        request = trainer_request(r.num_workers, r.cpus_per_worker, r.gpus_per_worker, use_gpu)

        def stalled() -> bool:
            with self._lock:
                others = [d for n, d in self._running.items() if n != name]
            return not self._started(run_dir) and not any(self._started(d) for d in others)

        def describe(waited: float) -> str:
            return waiting_message(
                f"training {name} ({r.num_workers} Ray Train worker(s))", waited, request,
                ray.cluster_resources(), ray.available_resources(),
                "give the cluster what one trainer asks for (`ray start --head --num-cpus N`, GPU nodes), or ask "
                "for less (resources.cpus_per_worker, resources.num_workers, resources.use_gpu=false), or train "
                "in the driver (resources.num_workers=0)")

        with self._lock:
            self._running[name] = run_dir
        try:
            with Watchdog(f"train {name}", r.stall_timeout_s, describe, stalled=stalled):
                yield
        finally:
            with self._lock:
                self._running.pop(name, None)


_TRAINERS = _TrainerWatch()
