"""Lung masks for films of any size: resize in, U-Net, resize back, clean up.

Post-processing keeps the two largest connected components (two lungs) and fills their holes,
which removes specks in the void and gaps where dense opacities fooled the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from cycle.io import atomic_torch_save
from cycle.lungseg.unet import DEFAULT_CHANNELS, build_unet, size_multiple

MEAN, STD = 0.449, 0.226


def postprocess(mask: np.ndarray, keep: int = 2, min_fraction: float = 0.002) -> np.ndarray:
    """Keep the `keep` largest components (each at least `min_fraction` of the image), fill
    holes."""
    mask = mask.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:keep] + 1
    min_area = min_fraction * mask.size
    kept = np.isin(labels, [i for i in order if stats[i, cv2.CC_STAT_AREA] >= min_area])
    return fill_holes(kept)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood == 0
    return (padded.astype(bool) | holes)[1:-1, 1:-1]


def to_input(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W] films of any sizes -> normalised [N, 1, size, size]."""
    batch = [
        cv2.resize(
            img,
            (size, size),
            interpolation=cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR,
        )
        for img in images
    ]
    tensor = torch.from_numpy(np.stack(batch)).float().div_(255.0)
    return tensor.sub_(MEAN).div_(STD).unsqueeze(1)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[np.ndarray] | np.ndarray,
    size: int | None = None,
    batch_size: int = 16,
    clean: bool = True,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """Lung masks (bool, each the size of its film) for uint8 grayscale films of any sizes, in
    batches of exactly `batch_size` (the last one padded), so a film's mask does not depend on
    how many films came with it (CPU convolutions round differently at other batch sizes)."""
    size = size or getattr(model, "image_size", 128)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    masks: list[np.ndarray] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = to_input(chunk, size)
            if len(chunk) < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - len(chunk), *x.shape[1:]))])
            probs = model(x.to(device)).softmax(dim=1)[:, 1].float().cpu().numpy()[: len(chunk)]
            for film, prob in zip(chunk, probs):
                # Resize the probability, not the hard mask: smooth edges at any scale.
                full = (
                    cv2.resize(prob, (film.shape[1], film.shape[0]), interpolation=cv2.INTER_LINEAR)
                    > 0.5
                )
                masks.append(postprocess(full) if clean else full)
    finally:
        model.train(was_training)
    return masks


def lung_model_meta(image_size: int, channels=DEFAULT_CHANNELS, num_res_units: int = 2) -> dict:
    return {
        "kind": "monai_unet",
        "image_size": image_size,
        "channels": list(channels),
        "num_res_units": num_res_units,
    }


def save_lung_model(path: str | Path, model: nn.Module, image_size: int, **extra) -> Path:
    """Weights + what `load_lung_model` needs to rebuild the network, written atomically."""
    return atomic_torch_save(
        path, {"model": model.state_dict(), "meta": lung_model_meta(image_size), **extra}
    )


def load_lung_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A U-Net saved by `jobs/train_lungseg.py`; `.image_size` tells `predict` its input size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lung model not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved.get("meta", {}) if isinstance(saved, dict) else {}
    if meta.get("kind") != "monai_unet":
        raise ValueError(f"{path} is not a lung U-Net checkpoint of this project")
    model = build_unet(meta["channels"], meta["num_res_units"])
    model.load_state_dict(saved["model"])
    model.image_size = meta["image_size"]
    return model.to(device).eval()


def check_size(size: int, channels) -> None:
    if size % size_multiple(channels):
        raise ValueError(
            f"lungseg.image_size must be a multiple of {size_multiple(channels)}, got {size}"
        )


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Per-image Dice and IoU of boolean masks (both empty: a perfect 1.0)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    union = np.logical_or(pred, truth).sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / union)
