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

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cycle.cam import compute_cam
from cycle.checkpoint import load_classifier
from cycle.config import Config
from cycle.data.films import FilmStreams, in_order_rows, to_tensors
from cycle.data.phantom import load_mask
from cycle.data.records import Record
from cycle.data.transforms import load_grayscale
from cycle.io import atomic_write, atomic_write_json, atomic_write_text
from cycle.layout import METRICS, localization_files, predictions
from cycle.localization import flat_summary, localization_metrics
from cycle.lungseg.masks import load_lung_model
from cycle.lungseg.masks import predict as predict_lungs
from cycle.metrics import classification_metrics, confusion_matrix, prefixed
from cycle.probe import ContextProbe
from cycle.resources import release_freed_memory

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
    model: nn.Module, films: FilmStreams, name: str, cfg: Config, device: torch.device
) -> dict[str, np.ndarray]:
    """Per-film P(PNEUMONIA), loss and label over a whole set, by film index (no augmentation),
    streamed: blocks of films as they come, never the set at once."""
    was_training = model.training
    model.eval()
    indices, probs, losses, labels = [], [], [], []
    rows = in_order_rows(films.batches(name))
    while chunk := [row for _, row in zip(range(max(cfg.train.batch_size, 64)), rows)]:
        images, y, index = to_tensors(chunk, films.preprocess)
        with autocast(cfg, device):
            logits = model(images.to(device, non_blocking=True)).float()
        y = y.to(device)
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
        probs.append(logits.softmax(dim=1)[:, 1].cpu().numpy())
        labels.append(y.cpu().numpy())
        indices.extend(index)
        release_freed_memory()
    model.train(was_training)
    index = np.asarray(indices, np.int64)
    order = np.argsort(index, kind="stable")

    def joined(parts: list, dtype) -> np.ndarray:
        return (np.concatenate(parts) if parts else np.zeros(0)).astype(dtype)[order]

    return {
        "index": index[order],
        "probs": joined(probs, np.float64),
        "losses": joined(losses, np.float64),
        "labels": joined(labels, np.int64),
    }


def split_metrics(
    model: nn.Module, films: FilmStreams, name: str, cfg: Config, device: torch.device
) -> dict[str, float]:
    out = predict(model, films, name, cfg, device)
    return classification_metrics(out["labels"], out["probs"], out["losses"])


def evaluate_splits(
    model: nn.Module,
    films: FilmStreams,
    cfg: Config,
    device: torch.device,
    run_dir: Path,
    **flat_extra,
) -> tuple[dict, dict]:
    """Every evaluation split present in `films`: run_dir/metrics.json ({"flat", "splits"})
    and predictions_<split>.csv. Returns (flat metrics, metrics per split)."""
    results, flat = {}, dict(flat_extra)
    for split in EVAL_SPLITS:
        if split not in films:
            continue
        out = predict(model, films, split, cfg, device)
        metrics = classification_metrics(out["labels"], out["probs"], out["losses"])
        metrics["confusion_matrix"] = confusion_matrix(out["labels"], out["probs"] >= 0.5).tolist()
        results[split] = metrics
        flat.update(prefixed(metrics, split))
        records = films.sets[split].records()
        lines = ["path,label,prob_pneumonia"] + [
            f"{records[i].path},{records[i].label},{p:.6f}"
            for i, p in zip(out["index"], out["probs"])
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


@dataclass
class Localization:
    """What `localize` measures: the summary (mean and 95% CI of each metric), each film's values
    in record order (for paired comparisons across cycles and seeds) and the panel's films, CAMs
    and predictions (for CAM grids and before/after pictures). Arrays and numbers only: a
    training worker measures it and leaves it beside its weights (`save_as`); the evaluation
    stage reads it back (`load_from`)."""

    summary: dict[str, float]
    per_image: dict[str, np.ndarray]
    panel: dict[str, np.ndarray] | None = None

    def save(self, out_npz: str | Path | None = None, per_image_npz: str | Path | None = None):
        for path, arrays in ((per_image_npz, self.per_image), (out_npz, self.panel)):
            if path is not None and arrays is not None:
                atomic_write(path, lambda tmp, a=arrays: np.savez_compressed(open(tmp, "wb"), **a))

    def save_as(self, folder: Path, split: str) -> list[str]:
        """Into `folder` under the names `localization_files(split)`; returns the names."""
        names = localization_files(split)
        self.save(folder / names[2] if self.panel is not None else None, folder / names[1])
        atomic_write_json(folder / names[0], self.summary)
        return [n for n in names if (folder / n).is_file()]

    @classmethod
    def load_from(cls, folder: Path, split: str) -> Localization:
        summary, per_image, panel = (folder / n for n in localization_files(split))
        return cls(
            json.loads(summary.read_text()),
            dict(np.load(per_image, allow_pickle=False)),
            dict(np.load(panel, allow_pickle=False)) if panel.is_file() else None,
        )


def localize(
    classifier_path: str | Path,
    records: Sequence[Record],
    cam_method: str,
    lung_model_path: str | Path | None = None,
    panel: Sequence[Record] = (),
    batch_size: int = 32,
    seed: int = 0,
    cam_depth: int | str = 0,
    probe_dilate_px: int | None = None,
) -> Localization:
    """Where the classifier's CAM looks on `records` (their truth masks where present, else the
    U-Net's lungs), on this process's GPU if it has one. With `probe_dilate_px`, also the
    context-swap probe (cycle.probe) on the same films, with the U-Net's lung masks (phantoms
    too). The evaluation stage runs it as a Ray task, on the cluster's workers."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, pre = load_classifier(classifier_path, device)
    unet = _LazyLungModel(lung_model_path, device)
    per_image: dict[str, list[np.ndarray]] = {}
    # The probe streams with the CAMs: a chunk's films in memory, never the split's.
    probe = None
    if probe_dilate_px is not None and records:
        probe = ContextProbe(np.array([r.label for r in records]), seed)

    def crops_of(indices: np.ndarray) -> np.ndarray:
        """Donor films, read again: a donor may lie in any chunk, and none is kept."""
        return np.stack([pre.crop(pre.resize(load_grayscale(records[i].path))) for i in indices])

    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        films = [pre.resize(load_grayscale(r.path)) for r in chunk]
        crops = np.stack([pre.crop(f) for f in films])
        x = torch.stack([pre.normalise(c) for c in crops]).to(device)
        cams = compute_cam(model, x, method=cam_method, depth=cam_depth, batch_size=batch_size)
        masks = _masks(chunk, films, pre, unet)
        for name, values in localization_metrics(cams.cpu().numpy(), **masks).items():
            per_image.setdefault(name, []).append(values)
        if probe is not None:
            # The probe reads the U-Net's lungs even where truth masks exist: on phantoms it
            # must see what it sees on real films, or its check against the truth flatters it.
            truth_lungs = masks["lesions"] is not None
            lungs = _unet_lungs(films, pre, unet) if truth_lungs else masks["lungs"]
            indices = np.arange(start, start + len(chunk))
            probe.add(
                model, indices, crops, lungs, crops_of, pre.normalise, probe_dilate_px, batch_size
            )
    values = {k: np.concatenate(v) for k, v in per_image.items()}
    if probe is not None:
        values.update(probe.values())
    result = Localization(
        flat_summary(values, seed=seed),
        {**values, "paths": np.array([str(r.path) for r in records])},
    )
    if panel:
        resized = [pre.resize(load_grayscale(r.path)) for r in panel]
        films = np.stack([pre.crop(f) for f in resized])
        x = torch.stack([pre.normalise(f) for f in films]).to(device)
        cams, logits = compute_cam(
            model, x, method=cam_method, return_logits=True, depth=cam_depth, batch_size=batch_size
        )
        result.panel = {
            "films": films,
            "cams": cams.cpu().numpy(),
            "probs": logits.softmax(1)[:, 1].cpu().numpy(),
            "labels": np.array([r.label for r in panel]),
            "lungs": _masks(panel, resized, pre, unet)["lungs"],
        }
    return result


def localize_splits(
    classifier_path: str | Path,
    splits: dict[str, tuple[Sequence[Record], Sequence[Record]]],
    **common,
) -> dict[str, Localization]:
    """`localize` on each split's (records, panel), in one process: one task of the evaluation
    stage per architecture."""
    return {
        name: localize(classifier_path, records, panel=panel, **common)
        for name, (records, panel) in splits.items()
    }


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
    """`localize` in this process: the summary, with the panel written to `out_npz` and each
    film's values to `per_image_npz` when given."""
    result = localize(
        classifier_path,
        records,
        cam_method,
        lung_model_path,
        panel=panel if out_npz is not None else (),
        batch_size=batch_size,
        seed=seed,
        cam_depth=cam_depth,
        probe_dilate_px=probe_dilate_px,
    )
    result.save(out_npz, per_image_npz)
    return result.summary


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

    def __init__(self, path: str | Path | None, device: torch.device):
        self.path, self.device, self.model = path, device, None

    def get(self):
        if self.model is None:
            if self.path is None:
                raise ValueError("no truth masks beside these films: pass a lung model")
            self.model = load_lung_model(self.path, self.device)
        return self.model
