"""Where does the map put its mass? Localisation and shortcut metrics (listed in the README,
"Grad-CAM at the cost of one forward pass"). A cycle logs them by these names for the test films,
with bootstrap 95% intervals as `{name}_ci_low` / `{name}_ci_high` (`flat_summary`), and for val
as `val_{name}`.

Per image, vectorised over a batch of maps [N, H, W] and boolean masks [N, H, W]:
- lung energy share: sum(CAM * lung) / sum(CAM), and its enrichment over the lung's share of the
  image (a uniform map scores 1.0); needs only a lung mask, so it works on real data too;
- lesion pointing game: the CAM's argmax lies in the lesion mask (images with a lesion only);
- lesion energy share and confounder energy share (mass on tags and markers).
A value that is undefined for an image (empty mask, all-zero map) is NaN, and means skip NaNs.
"""

from __future__ import annotations

import numpy as np


def _as_batch(array) -> np.ndarray:
    arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    return arr[None] if arr.ndim == 2 else arr


def energy_share(cams, masks) -> np.ndarray:
    """sum(CAM * mask) / sum(CAM) per image; NaN for an all-zero map or an empty mask."""
    cams = _as_batch(cams).astype(np.float64)
    masks = _as_batch(masks).astype(bool)
    total = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    valid = (total > 0) & masks.any(axis=(1, 2))
    return np.where(valid, inside / np.where(total > 0, total, 1.0), np.nan)


def enrichment(cams, masks) -> np.ndarray:
    """Energy share over area share: 1.0 for a uniform map, > 1 when the map favours the mask."""
    masks = _as_batch(masks).astype(bool)
    area = masks.mean(axis=(1, 2))
    share = energy_share(cams, masks)
    return np.where(area > 0, share / np.where(area > 0, area, 1.0), np.nan)


def pointing_game(cams, masks) -> np.ndarray:
    """1.0 where the map's maximum falls inside the mask, 0.0 outside (a flat map points
    nowhere: 0.0); NaN where the mask is empty (e.g. NORMAL films have no lesion)."""
    cams = _as_batch(cams).astype(np.float64)
    masks = _as_batch(masks).astype(bool)
    n = len(cams)
    flat_index = cams.reshape(n, -1).argmax(axis=1)
    hit = masks.reshape(n, -1)[np.arange(n), flat_index].astype(np.float64)
    hit[cams.reshape(n, -1).max(axis=1) <= 0] = 0.0
    return np.where(masks.any(axis=(1, 2)), hit, np.nan)


def localization_metrics(cams, lungs, lesions=None, confounders=None) -> dict[str, np.ndarray]:
    """Per-image values for every metric whose mask is given."""
    out = {
        "lung_energy_share": energy_share(cams, lungs),
        "lung_enrichment": enrichment(cams, lungs),
    }
    if lesions is not None:
        out["lesion_pointing_game"] = pointing_game(cams, lesions)
        out["lesion_energy_share"] = energy_share(cams, lesions)
    if confounders is not None:
        out["confounder_energy_share"] = energy_share(cams, confounders)
    return out


def bootstrap_ci(
    values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap (1 - alpha) interval of the non-NaN values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(values.mean()), float(low), float(high))


def summarize(
    per_image: dict[str, np.ndarray], seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    return {name: bootstrap_ci(values, seed=seed) for name, values in per_image.items()}


def flat_summary(per_image: dict[str, np.ndarray], seed: int = 0) -> dict[str, float]:
    """{name: mean, name_ci_low: ..., name_ci_high: ...}: ready to log."""
    out = {}
    for name, (mean, low, high) in summarize(per_image, seed).items():
        out[name] = mean
        out[f"{name}_ci_low"] = low
        out[f"{name}_ci_high"] = high
    return out
