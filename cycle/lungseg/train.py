"""Train the lung U-Net: Dice + cross-entropy, geometric and contrast augmentation (no flips),
validation Dice/IoU per epoch, atomic checkpoints every epoch, resume, MLflow logging.

Read top to bottom: pairs -> arrays (loaded once) -> model -> resume -> epochs -> best weights
(chosen on val Dice) -> test Dice/IoU with bootstrap intervals at the films' own resolution.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from cycle.checkpoint import read_checkpoint, restore_training_state, save_training_state
from cycle.config import PHANTOM_LUNG_MODEL, Config, config_hash
from cycle.console import say
from cycle.data.prepare import data_root
from cycle.data.records import Skipped
from cycle.data.transforms import Augment, ImageLoadError
from cycle.io import atomic_write_json, folder_lock
from cycle.localization import bootstrap_ci
from cycle.lungseg.data import Pair, find_pairs, load_pair
from cycle.lungseg.loss import DiceCELoss
from cycle.lungseg.masks import (
    MEAN,
    STD,
    check_size,
    dice_iou,
    load_lung_model,
    lung_model_meta,
    predict,
    save_lung_model,
)
from cycle.lungseg.unet import DEFAULT_CHANNELS, build_unet
from cycle.ray_checkpoints import stage_files
from cycle.resources import decide_gpu, trainer_request, waiting_message
from cycle.watchdog import Watchdog

LAST, BEST, HISTORY, STARTED = "last.pt", "best.pt", "history.json", "started.json"
RESULT_FILES = (BEST, HISTORY, "metrics.json", "masks_pred_vs_true.png", "skipped.json")


class LungModelMissing(RuntimeError):
    """Real data needs a lung model trained on real lung masks; the message says how."""


def load_arrays(
    pairs: Sequence[Pair], size: int
) -> tuple[np.ndarray, np.ndarray, list[Pair], list[Skipped]]:
    """Films and masks resized to size x size (uint8, bool), loaded in parallel threads."""

    def one(pair: Pair):
        try:
            film, mask = load_pair(pair)
        except ImageLoadError as err:
            return pair, err.reason
        film = cv2.resize(film, (size, size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(
            mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        return pair, (film, mask)

    with ThreadPoolExecutor() as pool:
        results = list(pool.map(one, pairs))
    kept = [(p, r) for p, r in results if not isinstance(r, str)]
    skipped = [Skipped(p.image, r) for p, r in results if isinstance(r, str)]
    if not kept:
        return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), bool), [], skipped
    films = np.stack([r[0] for _, r in kept])
    masks = np.stack([r[1] for _, r in kept])
    return films, masks, [p for p, _ in kept], skipped


# Wider geometry than the classifier's: a segmenter must hold up at every pose and zoom.
AUGMENT = Augment(rotation_deg=8.0, translate=0.06, scale=0.1, brightness=0.08, contrast=0.2)


def _tensor(films: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(films).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)


@torch.no_grad()
def _val_scores(model, films: np.ndarray, masks: np.ndarray, batch: int) -> tuple[float, float]:
    model.eval()
    device = next(model.parameters()).device
    dices, ious = [], []
    for start in range(0, len(films), batch):
        x = _tensor(films[start : start + batch]).to(device)
        pred = model(x).argmax(dim=1).cpu().numpy().astype(bool)
        for p, t in zip(pred, masks[start : start + batch]):
            d, i = dice_iou(p, t)
            dices.append(d)
            ious.append(i)
    return float(np.mean(dices)), float(np.mean(ious))


def train_lungseg(
    cfg: Config,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    tracker=None,
    log=print,
    device: torch.device | None = None,
) -> dict:
    """Train (or resume) in `out_dir` on `device` (default: this process's GPU, else its CPU);
    returns the test metrics, also written to metrics.json; history.json grows by an epoch at a
    time."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, lcfg = cfg.lungseg.image_size, cfg.lungseg
    check_size(size, DEFAULT_CHANNELS)
    by_split = {s: [p for p in pairs if p.split == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise ValueError("lung segmentation needs non-empty train and val pairs")
    train_x, train_y, _, skipped = load_arrays(by_split["train"], size)
    val_x, val_y, _, skipped_val = load_arrays(by_split["val"], size)
    skipped += skipped_val

    torch.manual_seed(cfg.seed)
    model = build_unet(DEFAULT_CHANNELS, num_res_units=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=lcfg.epochs)
    loss_fn = DiceCELoss()
    state = {"epoch": 0, "best_dice": -math.inf, "history": []}
    saved = read_checkpoint(out_dir / LAST, log, "lungseg") if (out_dir / LAST).is_file() else None
    if saved is not None:
        state = restore_training_state(saved, model, optimizer, scheduler)
        log(f"[lungseg] resuming after epoch {state['epoch']}")

    while state["epoch"] < lcfg.epochs:
        epoch, started = state["epoch"], time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        mean_loss = _train_epoch(model, optimizer, loss_fn, train_x, train_y, epoch, cfg)
        scheduler.step()
        dice, iou = _val_scores(model, val_x, val_y, lcfg.batch_size)
        improved = dice > state["best_dice"]
        state["best_dice"] = max(state["best_dice"], dice)
        state["epoch"] = epoch + 1
        row = {
            "epoch": epoch + 1,
            "train_loss": mean_loss,
            "val_dice": dice,
            "val_iou": iou,
            "seconds": time.perf_counter() - started,
        }
        state["history"].append(row)
        if improved:
            save_lung_model(out_dir / BEST, model, size, epoch=epoch + 1)
        save_training_state(
            out_dir / LAST, model, optimizer, scheduler, state, lung_model_meta(size)
        )
        atomic_write_json(out_dir / HISTORY, state["history"])
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        log(
            f"[lungseg] epoch {epoch + 1}/{lcfg.epochs}  "
            f"loss {row['train_loss']:.4f}  val_dice {dice:.4f}  "
            f"val_iou {iou:.4f}  {row['seconds']:.1f}s{' (best)' if improved else ''}"
        )

    metrics = evaluate_lungseg(out_dir / BEST, by_split["test"] or by_split["val"], out_dir)
    metrics["skipped"] = len(skipped)
    atomic_write_json(out_dir / "metrics.json", metrics)
    if skipped:
        atomic_write_json(
            out_dir / "skipped.json", [{"path": s.path, "reason": s.reason} for s in skipped]
        )
    return metrics


def _train_epoch(
    model, optimizer, loss_fn, films: np.ndarray, masks: np.ndarray, epoch: int, cfg: Config
) -> float:
    """One pass over the training pairs in a seeded order, each pair augmented by its own seeded
    draw; returns the mean loss."""
    model.train()
    device = next(model.parameters()).device
    order = np.random.default_rng([cfg.seed, epoch, 11]).permutation(len(films))
    total = 0.0
    for start in range(0, len(order), cfg.lungseg.batch_size):
        idx = order[start : start + cfg.lungseg.batch_size]
        batch = [
            AUGMENT.pair(films[i], masks[i], np.random.default_rng([cfg.seed, epoch, int(i)]))
            for i in idx
        ]
        x = _tensor(np.stack([b[0] for b in batch])).to(device)
        y = torch.from_numpy(np.stack([b[1] for b in batch])).long().unsqueeze(1).to(device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(order)


def evaluate_lungseg(
    weights: str | Path, pairs: Sequence[Pair], out_dir: str | Path | None = None
) -> dict:
    """Dice and IoU on each film at its own resolution (predict() round trip), with 95% CIs."""
    model = load_lung_model(weights)
    dices, ious, films, truths, preds = [], [], [], [], []
    for pair in pairs:
        try:
            film, truth = load_pair(pair)
        except ImageLoadError:
            continue
        (pred,) = predict(model, [film])
        d, i = dice_iou(pred, truth)
        dices.append(d)
        ious.append(i)
        if len(films) < 8:
            films.append(film)
            truths.append(truth)
            preds.append(pred)
    dice, iou = bootstrap_ci(dices), bootstrap_ci(ious)
    metrics = {
        "test_dice": dice[0],
        "test_dice_ci_low": dice[1],
        "test_dice_ci_high": dice[2],
        "test_iou": iou[0],
        "test_iou_ci_low": iou[1],
        "test_iou_ci_high": iou[2],
        "n_test": len(dices),
    }
    if out_dir is not None and films:
        from cycle.plots import mask_comparison

        mask_comparison(films, truths, preds, Path(out_dir) / "masks_pred_vs_true.png")
    return metrics


# ---------------------------------------------------------------------------------------------
# On a Ray Train worker


def lungseg_train_func(config: dict) -> None:
    """Ray Train's entry point for the U-Net: `train_lungseg` on the worker's device."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["config"])
    # Alone on its node when a job starts (nothing else trains then): every core of it, not the
    # one thread Ray gives a 1-CPU worker.
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = [Pair(p["image"], tuple(p["masks"]), p["split"], p["group"]) for p in config["pairs"]]
    out_dir = Path(config["out_dir"])
    atomic_write_json(out_dir / STARTED, {"pid": os.getpid(), "time": time.time()})
    metrics = train_lungseg(cfg, pairs, out_dir, log=say, device=ray.train.torch.get_device())
    # What the driver needs, as Ray's checkpoint: the worker may be on a node whose disk the
    # driver cannot see.
    handed = [n for n in RESULT_FILES if (out_dir / n).is_file()]
    final = stage_files(out_dir / "ray_final", out_dir, handed)
    ray.train.report(
        {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        checkpoint=ray.train.Checkpoint.from_directory(str(final)),
    )


def fit_lungseg(
    cfg: Config, pairs: Sequence[Pair], out_dir: str | Path, log=print, on_ray: bool = False
) -> dict:
    """`train_lungseg` here, or (`on_ray`, Ray already joined) on one Ray Train worker with the
    classifiers' resources: resources.cpus_per_worker, a GPU by resources.use_gpu (`true` waits
    for GPU nodes). A worker that never gets them is said and stopped after
    resources.stall_timeout_s. Resumes from out_dir's last.pt either way."""
    if not on_ray:
        return train_lungseg(cfg, pairs, out_dir, log=log)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    r = cfg.resources
    use_gpu = decide_gpu(r.use_gpu, ray.cluster_resources())[0]
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        lungseg_train_func,
        train_loop_config={
            "config": cfg.with_absolute_paths().model_dump(mode="json"),
            "pairs": [asdict(p) for p in pairs],
            "out_dir": str(out_dir),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"lungseg-{out_dir.name}",
            storage_path=cfg.storage_path(),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
        ),
    )
    (out_dir / STARTED).unlink(missing_ok=True)

    def describe(waited: float) -> str:
        return waiting_message(
            "training the lung U-Net (1 Ray Train worker)",
            waited,
            trainer_request(1, r.cpus_per_worker, r.gpus_per_worker, use_gpu),
            ray.cluster_resources(),
            ray.available_resources(),
            "give the cluster what one worker asks for, or train it in the driver "
            "(resources.num_workers=0)",
        )

    def not_started() -> bool:
        return not (out_dir / STARTED).is_file()

    with Watchdog("train the lung U-Net", r.stall_timeout_s, describe, stalled=not_started):
        result = trainer.fit()
    if not (out_dir / "metrics.json").is_file() and result.checkpoint is not None:
        result.checkpoint.to_directory(str(out_dir))  # trained on another node
    return json.loads((out_dir / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# The lung model the cycle uses


def lung_model_dir(cfg: Config) -> Path:
    """Phantom lung models are cached by what they depend on: the phantoms and lungseg settings."""
    return Path(cfg.output_dir) / "lungseg" / config_hash(cfg, "lungseg", "data", "seed")


def ensure_lung_model(cfg: Config, log=print, on_ray=None) -> Path:
    """The configured lung model, or (phantoms, or lungseg.weights=phantom) the U-Net trained
    once on the phantoms' lung masks and reused. `on_ray`: a callable that joins Ray; where a
    model must be trained, it is called and the U-Net trains on a Ray Train worker."""
    if cfg.lungseg.weights == PHANTOM_LUNG_MODEL:
        if cfg.data.root is not None:
            log(
                "[plan] lung masks: the U-Net trained on the phantoms (lungseg.weights=phantom); "
                "its quality on real films is unmeasured (no real lung masks here). For a measured "
                "one, train on Montgomery, Shenzhen or JSRT: jobs/train_lungseg.py --data DIR"
            )
        # The same cached model as a phantom run of these settings.
        return ensure_lung_model(
            cfg.with_overrides({"data.root": None, "lungseg.weights": None}), log=log, on_ray=on_ray
        )
    if cfg.lungseg.weights:
        path = Path(cfg.lungseg.weights)
        if not path.is_file():
            raise LungModelMissing(f"lungseg.weights={path} does not exist")
        return path
    if cfg.data.root is not None:
        raise LungModelMissing(
            "real data needs a lung U-Net trained on real lung masks: train one with\n"
            "  python jobs/train_lungseg.py --data /path/to/MontgomerySet "
            "(or Shenzhen, JSRT/SCR, images/+masks/)\n"
            "then pass --set lungseg.weights=outputs/lungseg/<run>/best.pt"
        )
    out = lung_model_dir(cfg)
    if (out / "metrics.json").is_file():
        return out / BEST
    # Jobs share the cached model: the second waits for the first to train it, then reuses it.
    with folder_lock(out, "the cached lung model", wait=True, log=log):
        if not (out / "metrics.json").is_file():
            log(
                "[lungseg] no lung model configured: "
                f"training one on the phantom lung masks in {out}"
            )
            _, pairs, _ = find_pairs(
                data_root(cfg, verbose=True).parent,
                cfg.data.val_fraction,
                seed=cfg.seed,
                cache_dir=Path(cfg.output_dir) / "cache",
            )
            if on_ray is not None:
                on_ray()
            metrics = fit_lungseg(cfg, pairs, out, log=log, on_ray=on_ray is not None)
            log(f"[lungseg] lung model ready: {summary_line(metrics)}")
    return out / BEST


def summary_line(metrics: dict) -> str:
    return (
        f"test Dice {metrics['test_dice']:.4f} (95% CI {metrics['test_dice_ci_low']:.4f}-"
        f"{metrics['test_dice_ci_high']:.4f}), IoU {metrics['test_iou']:.4f} "
        f"({metrics['test_iou_ci_low']:.4f}-{metrics['test_iou_ci_high']:.4f}) "
        f"on {metrics['n_test']} films"
    )
