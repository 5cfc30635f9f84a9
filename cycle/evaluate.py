"""Where a trained classifier looks, on the ORIGINAL test films: localisation metrics with 95%
intervals, and the CAMs of a fixed panel of 49 films for before/after pictures.

Truth masks come from the phantom tree where present (lungs, lesions, confounders); on real data
the lung mask comes from the U-Net and only the lung metrics are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cycle.cam import compute_cam
from cycle.checkpoint import load_classifier
from cycle.data.phantom import load_mask
from cycle.data.records import Record
from cycle.data.transforms import load_grayscale
from cycle.io import atomic_write
from cycle.localization import flat_summary, localization_metrics

PANEL = 49


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
    cam_depth: int = 0,
) -> dict[str, float]:
    """Mean and CI of each localisation metric over `records`; the panel's films, CAMs and
    predictions go to `out_npz` (for CAM grids and before/after pictures), each film's values in
    record order to `per_image_npz` (for paired comparisons across cycles and seeds)."""
    model, pre = load_classifier(classifier_path)
    unet = _LazyLungModel(lung_model_path)
    per_image: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        films = [pre.resize(load_grayscale(r.path)) for r in chunk]
        x = torch.stack([pre.normalise(pre.crop(f)) for f in films])
        cams = compute_cam(model, x, method=cam_method, depth=cam_depth, batch_size=batch_size).numpy()
        masks = _masks(chunk, films, pre, unet)
        for name, values in localization_metrics(cams, **masks).items():
            per_image.setdefault(name, []).append(values)
    values = {k: np.concatenate(v) for k, v in per_image.items()}
    summary = flat_summary(values, seed=seed)
    if per_image_npz is not None:
        arrays = {**values, "paths": np.array([str(r.path) for r in records])}
        atomic_write(per_image_npz, lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays))
    if panel and out_npz is not None:
        resized = [pre.resize(load_grayscale(r.path)) for r in panel]
        films = np.stack([pre.crop(f) for f in resized])
        x = torch.stack([pre.normalise(f) for f in films])
        cams, logits = compute_cam(model, x, method=cam_method, return_logits=True, depth=cam_depth,
                                   batch_size=batch_size)
        lungs = _masks(panel, resized, pre, unet)["lungs"]
        arrays = {"films": films, "cams": cams.numpy(), "probs": logits.softmax(1)[:, 1].numpy(),
                  "labels": np.array([r.label for r in panel]), "lungs": lungs}
        atomic_write(out_npz, lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays))
    return summary


def _masks(records: Sequence[Record], resized_films, pre, unet) -> dict[str, np.ndarray | None]:
    truth = [load_mask(r.path, "lungs") for r in records]
    if all(t is not None for t in truth):
        kinds = {"lungs": truth}
        for kind in ("lesions", "confounders"):
            kinds[kind] = [load_mask(r.path, kind) for r in records]
        return {k: np.stack([pre.crop_mask(m) for m in v]) for k, v in kinds.items()}
    from cycle.lungseg.masks import predict

    lungs = predict(unet.get(), list(resized_films))
    return {"lungs": np.stack([pre.crop(m) for m in lungs]), "lesions": None, "confounders": None}


class _LazyLungModel:
    """The U-Net, loaded on first need: phantom films carry their truth masks and never need it."""

    def __init__(self, path: str | Path | None):
        self.path, self.model = path, None

    def get(self):
        if self.model is None:
            if self.path is None:
                raise ValueError("no truth masks beside these films: pass a lung model")
            from cycle.lungseg.masks import load_lung_model

            self.model = load_lung_model(self.path)
        return self.model

