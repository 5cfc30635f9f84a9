"""Classifier weights with what is needed to use them: architecture and input geometry."""

from __future__ import annotations

from pathlib import Path

import torch

from cycle.config import Config
from cycle.data.transforms import Preprocess
from cycle.io import atomic_torch_save
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
    return atomic_torch_save(path, {"model": model.state_dict(), "meta": model_meta(cfg, model), **extra})


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, Preprocess]:
    """Rebuild the classifier a checkpoint (best.pt / last.pt) was trained as, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved.get("meta") if isinstance(saved, dict) else None
    if not meta:
        raise ValueError(f"{path} has no 'meta' (architecture, input size): is it a checkpoint of this project?")
    model = build_model(meta["arch"], num_classes=meta["num_classes"], image_size=meta["image_size"])
    model.load_state_dict(saved["model"])
    preprocess = Preprocess(meta["image_size"], meta["crop_fraction"], meta["mean"], meta["std"])
    return model.to(device).eval(), preprocess
