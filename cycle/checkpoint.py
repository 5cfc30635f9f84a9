"""Checkpoints: classifier weights with what is needed to use them (architecture, input
geometry), and the training state a resumed run continues from (classifier and lung U-Net)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cycle.config import Config
from cycle.data.transforms import Preprocess
from cycle.io import atomic_torch_save
from cycle.model_refs import local_checkpoint
from cycle.models import Classifier, build_model


def model_meta(cfg: Config, model: Classifier) -> dict:
    """What rebuilding `model` needs: its own architecture, the config's input geometry."""
    return {
        "arch": model.arch,
        "image_size": cfg.data.image_size,
        "crop_fraction": cfg.data.crop_fraction,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "num_classes": 2,
    }


def save_classifier(path: str | Path, model: Classifier, cfg: Config, **extra) -> Path:
    return atomic_torch_save(
        path, {"model": model.state_dict(), "meta": model_meta(cfg, model), **extra}
    )


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> tuple[Classifier, Preprocess]:
    """Rebuild the classifier a checkpoint (best.pt / last.pt) was trained as, in eval mode.
    `path` may also name an MLflow model (`models:/name@alias`, `models:/name/3`,
    `runs:/<id>/model`, looked up in `tracking_uri`; see cycle.model_refs)."""
    with local_checkpoint(path, tracking_uri) as local:
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint not found: {local}")
        saved = torch.load(local, map_location="cpu", weights_only=True)
    meta = saved.get("meta") if isinstance(saved, dict) else None
    if not meta:
        raise ValueError(
            f"{path} has no 'meta' (architecture, input size): is it a checkpoint of this project?"
        )
    model = build_model(
        meta["arch"], num_classes=meta["num_classes"], image_size=meta["image_size"]
    )
    model.load_state_dict(saved["model"])
    preprocess = Preprocess(meta["image_size"], meta["crop_fraction"], meta["mean"], meta["std"])
    return model.to(device).eval(), preprocess


# ---------------------------------------------------------------------------------------------
# Training state: what a loop interrupted after any epoch resumes from


def save_training_state(
    path: str | Path, model: nn.Module, optimizer, scheduler, state: dict, meta: dict
) -> Path:
    """Weights, optimiser, scheduler, the loop's own state (epoch, best so far, history) and the
    model's meta, written atomically: a crash leaves the previous epoch's file whole."""
    return atomic_torch_save(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "meta": meta,
        },
    )


def read_checkpoint(
    path: str | Path, log: Callable[[str], None] = print, who: str = ""
) -> dict | None:
    """A checkpoint, or None (with a message) when it is truncated or unreadable: the stage then
    starts over instead of ending in a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, empty file: all mean "not a checkpoint"
        prefix = f"[{who}] " if who else ""
        log(f"{prefix}{path} is unreadable ({type(err).__name__}: {err}); starting this stage over")
        return None


def restore_training_state(saved: dict, model: nn.Module, optimizer, scheduler) -> dict:
    """Load a saved training state into the live objects; returns the loop's state."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["state"]
