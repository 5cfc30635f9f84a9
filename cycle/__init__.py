"""cycle: make chest X-ray classifiers look at the lungs, and prove it.

Train -> Grad-CAM over the training set -> lung masks -> enhanced training set -> fine-tune ->
evaluate on the original images -> repeat; on Ray, tracked in MLflow.

The public API, for scripts and notebooks::

    import cycle

    cfg = cycle.load_config("configs/smoke.yaml", ["model.arch=resnet18"])
    model = cycle.build_model("resnet18", num_classes=2, image_size=128)
    model, preprocess = cycle.load_classifier("outputs/train-resnet18-seed0/best.pt")
    maps = cycle.grad_cam(model, images)                 # or hires_cam, compute_cam(method="auto")
    shares = cycle.energy_share(maps, lung_masks)        # localisation metrics, per image
    masks = cycle.predict_lungs(cycle.load_lung_model("best.pt"), films)
    cycle.build_shards(cfg, records, classifier, lung_model, "out/shards")

Names load on first use, so `import cycle` stays cheap (no torch, Ray or MLflow until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    # configuration
    "Config": "cycle.config",
    "ConfigError": "cycle.config",
    "load_config": "cycle.config",
    # models and checkpoints
    "build_model": "cycle.models",
    "register": "cycle.models",
    "available_architectures": "cycle.models",
    "load_classifier": "cycle.checkpoint",
    "save_classifier": "cycle.checkpoint",
    # class activation maps
    "grad_cam": "cycle.cam",
    "hires_cam": "cycle.cam",
    "compute_cam": "cycle.cam",
    "GradCAM": "cycle.cam",
    "HiResCAM": "cycle.cam",
    # localisation metrics
    "energy_share": "cycle.localization",
    "enrichment": "cycle.localization",
    "pointing_game": "cycle.localization",
    "localization_metrics": "cycle.localization",
    "bootstrap_ci": "cycle.localization",
    # lungs
    "load_lung_model": "cycle.lungseg.masks",
    "predict_lungs": "cycle.lungseg.masks",
    "train_lungseg": "cycle.lungseg.train",
    # data
    "load_dataset": "cycle.data.records",
    "write_phantoms": "cycle.data.phantom",
    "PhantomSpec": "cycle.data.phantom",
    # the cycle's stages
    "enhance_batch": "cycle.enhance",
    "build_shards": "cycle.shard_builder",
    "run_training": "cycle.train",
    "evaluate_localization": "cycle.evaluate",
    "explain_files": "cycle.explain",
    "Runner": "cycle.runner",
}
# Public names that differ from the name in their module.
_RENAMED = {"predict_lungs": "predict", "write_phantoms": "write_dataset"}

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "load_config",
    "build_model",
    "register",
    "available_architectures",
    "load_classifier",
    "save_classifier",
    "grad_cam",
    "hires_cam",
    "compute_cam",
    "GradCAM",
    "HiResCAM",
    "energy_share",
    "enrichment",
    "pointing_game",
    "localization_metrics",
    "bootstrap_ci",
    "load_lung_model",
    "predict_lungs",
    "train_lungseg",
    "load_dataset",
    "write_phantoms",
    "PhantomSpec",
    "enhance_batch",
    "build_shards",
    "run_training",
    "evaluate_localization",
    "explain_files",
    "Runner",
]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cycle' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what editors and type checkers see
    from cycle.cam import GradCAM, HiResCAM, compute_cam, grad_cam, hires_cam
    from cycle.checkpoint import load_classifier, save_classifier
    from cycle.config import Config, ConfigError, load_config
    from cycle.data.phantom import PhantomSpec
    from cycle.data.phantom import write_dataset as write_phantoms
    from cycle.data.records import load_dataset
    from cycle.enhance import enhance_batch
    from cycle.evaluate import evaluate_localization
    from cycle.explain import explain_files
    from cycle.localization import (
        bootstrap_ci,
        energy_share,
        enrichment,
        localization_metrics,
        pointing_game,
    )
    from cycle.lungseg.masks import load_lung_model
    from cycle.lungseg.masks import predict as predict_lungs
    from cycle.lungseg.train import train_lungseg
    from cycle.models import available_architectures, build_model, register
    from cycle.runner import Runner
    from cycle.shard_builder import build_shards
    from cycle.train import run_training
