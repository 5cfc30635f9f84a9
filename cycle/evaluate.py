"""Evaluate a classifier on the ORIGINAL films, never on the enhanced ones.

- Classification: P(PNEUMONIA) for every film of val, test and test_cf; accuracy, sensitivity,
  specificity, AUC, confusion matrix (metrics.json) and per-film predictions (CSV).
- Localisation: where its CAM looks on test (and val), with 95% intervals, and the CAMs of a
  fixed panel of 49 films for before/after pictures; the context-swap probe (cycle.probe): how
  much the answer comes from outside the lungs, on real films too. Truth masks come from the
  phantom tree where present (lungs, lesions, confounders); on real data the lung mask comes from
  the U-Net and only the lung metrics and the probe are defined. The probe always composes with
  the U-Net's lung masks, so that its check on the phantoms is the check of what real films get.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cycle.cam import compute_cam
from cycle.checkpoint import load_classifier
from cycle.config import Config
from cycle.data.dataset import ImageDataset
from cycle.data.phantom import load_mask
from cycle.data.records import Record
from cycle.data.transforms import load_grayscale
from cycle.io import atomic_write, atomic_write_json, atomic_write_text
from cycle.layout import METRICS, predictions
from cycle.localization import flat_summary, localization_metrics
from cycle.lungseg.masks import load_lung_model
from cycle.lungseg.masks import predict as predict_lungs
from cycle.metrics import classification_metrics, confusion_matrix, prefixed
from cycle.probe import context_probe

EVAL_SPLITS = ("val", "test", "test_cf")
PANEL = 49


# ---------------------------------------------------------------------------------------------
# Classification


def autocast(cfg: Config, device: torch.device):
    """bf16 on CUDA with train.amp, in training and evaluation alike; full precision elsewhere."""
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(
    model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device
) -> dict[str, np.ndarray]:
    """Per-image P(PNEUMONIA) and loss over a whole split, in record order (no augmentation)."""
    was_training = model.training
    model.eval()
    probs = np.zeros(len(dataset), np.float64)
    losses = np.zeros(len(dataset), np.float64)
    plain = DataLoader(
        dataset,
        batch_size=max(cfg.train.batch_size, 64),
        shuffle=False,
        num_workers=cfg.data.loader_workers,
    )
    for images, labels, index in plain:
        with autocast(cfg, device):
            logits = model(images.to(device, non_blocking=True)).float()
        labels = labels.to(device)
        losses[index.numpy()] = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
        probs[index.numpy()] = logits.softmax(dim=1)[:, 1].cpu().numpy()
    model.train(was_training)
    return {"probs": probs, "losses": losses, "labels": dataset.labels}


def split_metrics(
    model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device
) -> dict[str, float]:
    out = predict(model, dataset, cfg, device)
    return classification_metrics(out["labels"], out["probs"], out["losses"])


def evaluate_splits(
    model: nn.Module,
    datasets: dict[str, ImageDataset],
    cfg: Config,
    device: torch.device,
    run_dir: Path,
    **flat_extra,
) -> tuple[dict, dict]:
    """Every evaluation split present in `datasets`: run_dir/metrics.json ({"flat", "splits"})
    and predictions_<split>.csv. Returns (flat metrics, metrics per split)."""
    results, flat = {}, dict(flat_extra)
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
        atomic_write_text(run_dir / predictions(split), "\n".join(lines) + "\n")
    atomic_write_json(run_dir / METRICS, {"flat": flat, "splits": results})
    return flat, results


# ---------------------------------------------------------------------------------------------
# Localisation


def panel_records(records: Sequence[Record], seed: int, n: int = PANEL) -> list[Record]:
    """The same n test films for every cycle and architecture, both classes mixed."""
    order = np.random.default_rng([seed, 49]).permutation(len(records))
    return [records[i] for i in sorted(order[:n])]


def evaluate_localization(
    classifier_path: str | Path,
    records: Sequence[Record],
    cam_method: str,
    lung_model_path: str | Path | None = None,
    panel: Sequence[Record] = (),
    out_npz: str | Path | None = None,
    batch_size: int = 32,
    seed: int = 0,
    per_image_npz: str | Path | None = None,
    cam_depth: int | str = 0,
    probe_dilate_px: int | None = None,
) -> dict[str, float]:
    """Mean and CI of each localisation metric over `records`; the panel's films, CAMs and
    predictions go to `out_npz` (for CAM grids and before/after pictures), each film's values in
    record order to `per_image_npz` (for paired comparisons across cycles and seeds). With
    `probe_dilate_px`, also the context-swap probe (cycle.probe) on the same films, with the
    U-Net's lung masks (phantoms too)."""
    model, pre = load_classifier(classifier_path)
    unet = _LazyLungModel(lung_model_path)
    per_image: dict[str, list[np.ndarray]] = {}
    crops, lung_masks = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        films = [pre.resize(load_grayscale(r.path)) for r in chunk]
        chunk_crops = [pre.crop(f) for f in films]
        x = torch.stack([pre.normalise(c) for c in chunk_crops])
        cams = compute_cam(
            model, x, method=cam_method, depth=cam_depth, batch_size=batch_size
        ).numpy()
        masks = _masks(chunk, films, pre, unet)
        for name, values in localization_metrics(cams, **masks).items():
            per_image.setdefault(name, []).append(values)
        if probe_dilate_px is not None:
            crops.extend(chunk_crops)
            # The probe reads the U-Net's lungs even where truth masks exist: on phantoms it
            # must see what it sees on real films, or its check against the truth flatters it.
            truth_lungs = masks["lesions"] is not None
            lung_masks.append(_unet_lungs(films, pre, unet) if truth_lungs else masks["lungs"])
    values = {k: np.concatenate(v) for k, v in per_image.items()}
    if probe_dilate_px is not None and records:
        labels = np.array([r.label for r in records])
        values.update(
            context_probe(
                model,
                np.stack(crops),
                np.concatenate(lung_masks),
                labels,
                pre.normalise,
                seed=seed,
                dilate_px=probe_dilate_px,
                batch_size=batch_size,
            )
        )
    summary = flat_summary(values, seed=seed)
    if per_image_npz is not None:
        arrays = {**values, "paths": np.array([str(r.path) for r in records])}
        atomic_write(per_image_npz, lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays))
    if panel and out_npz is not None:
        resized = [pre.resize(load_grayscale(r.path)) for r in panel]
        films = np.stack([pre.crop(f) for f in resized])
        x = torch.stack([pre.normalise(f) for f in films])
        cams, logits = compute_cam(
            model, x, method=cam_method, return_logits=True, depth=cam_depth, batch_size=batch_size
        )
        lungs = _masks(panel, resized, pre, unet)["lungs"]
        arrays = {
            "films": films,
            "cams": cams.numpy(),
            "probs": logits.softmax(1)[:, 1].numpy(),
            "labels": np.array([r.label for r in panel]),
            "lungs": lungs,
        }
        atomic_write(out_npz, lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays))
    return summary


def _unet_lungs(resized_films, pre, unet) -> np.ndarray:
    return np.stack([pre.crop(m) for m in predict_lungs(unet.get(), list(resized_films))])


def _masks(records: Sequence[Record], resized_films, pre, unet) -> dict[str, np.ndarray | None]:
    truth = [load_mask(r.path, "lungs") for r in records]
    if all(t is not None for t in truth):
        kinds = {"lungs": truth}
        for kind in ("lesions", "confounders"):
            kinds[kind] = [load_mask(r.path, kind) for r in records]
        return {k: np.stack([pre.crop_mask(m) for m in v]) for k, v in kinds.items()}
    return {"lungs": _unet_lungs(resized_films, pre, unet), "lesions": None, "confounders": None}


class _LazyLungModel:
    """The U-Net, loaded on first need: films with truth masks need it for the probe only."""

    def __init__(self, path: str | Path | None):
        self.path, self.model = path, None

    def get(self):
        if self.model is None:
            if self.path is None:
                raise ValueError("no truth masks beside these films: pass a lung model")
            self.model = load_lung_model(self.path)
        return self.model
