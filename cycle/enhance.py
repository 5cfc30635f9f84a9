"""The enhanced training image: trusted lung evidence kept or emphasised, misleading context
neutralised. Pure functions on arrays (float32 in [0, 1], [N, H, W]); no Ray, no torch.

Modes (strength in [0, 1]; 0 returns the original image), each one function registered with
`@register_mode("name")` (cycle.registry.ENHANCE_MODES: then a valid `enhance.mode` and an
evidence variant):
- highlight:    the CAM, restricted to the (dilated) lungs, pushes pixels toward white
                (the original study's overlay);
- suppress:     everything outside the CAM-weighted lungs is dimmed toward black;
- context_swap: the lung region of image i is kept and everything outside the lungs comes from
                another training image j drawn at random across labels, blended at the mask edge,
                so context stops predicting the label while the input stays a whole chest film
                (`needs_donor=True`: the shard builder reads each film's donor film for it).

Trust rule: a CAM whose lung energy share is below `trust_threshold` does not show where the
evidence is; such an image falls back to `lung_only` (lungs kept, the rest suppressed),
`original`, or `drop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cycle.localization import energy_share
from cycle.registry import ENHANCE_MODES

FALLBACKS = ("original", "lung_only", "drop")


@dataclass
class Enhanced:
    images: np.ndarray  # float32 [N, H, W] in [0, 1]
    keep: np.ndarray  # bool [N]: False where the fallback is "drop"
    trusted: np.ndarray  # bool [N]
    lung_share: np.ndarray  # float [N]: CAM energy inside the lungs (NaN: flat map, no lungs)
    donors: np.ndarray  # int [N]: the context donor of each image (context_swap), else -1


def soft_mask(masks: np.ndarray, dilate_px: int, feather_px: float = 2.0) -> np.ndarray:
    """Boolean masks -> float masks: 1 on the mask dilated by `dilate_px`, fading to 0 outside
    it over about `feather_px` (outward only: the lungs themselves are never dimmed)."""
    out = np.empty(masks.shape, np.float32)
    kernel = (
        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1,) * 2)
        if dilate_px
        else None
    )
    for i, mask in enumerate(masks.astype(np.uint8)):
        grown = cv2.dilate(mask, kernel) if kernel is not None else mask
        soft = grown.astype(np.float32)
        if feather_px > 0:
            soft = np.maximum(soft, cv2.GaussianBlur(soft, (0, 0), feather_px))
        out[i] = soft
    return out


def restrict(cams: np.ndarray, lung_soft: np.ndarray) -> np.ndarray:
    """The CAM inside the (dilated) lungs, renormalised per image to a maximum of 1."""
    inside = cams * lung_soft
    peak = inside.reshape(len(inside), -1).max(axis=1)[:, None, None]
    return np.where(peak > 0, inside / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: every image gets another image's context."""
    if n < 2:
        return np.full(n, -1 if n == 0 else 0)
    order = rng.permutation(n)
    return np.roll(order, 1)[np.argsort(order)]


# ---------------------------------------------------------------------------------------------
# Modes: mode(images, cams, lung_soft, strength, donor_films) -> enhanced images, where
# lung_soft = soft_mask(lungs) and strength > 0. donor_films[i] is the film whose context image i
# takes: given only to modes registered with needs_donor=True (else None).

register_mode = ENHANCE_MODES.register


def needs_donor(mode: str) -> bool:
    """Whether `mode` takes each image's context from a donor film (ValueError if unknown)."""
    return bool(ENHANCE_MODES.info(mode).get("needs_donor", False))


@register_mode("highlight")
def highlight(images, cams, lung_soft, strength, donor_films=None) -> np.ndarray:
    trusted = restrict(np.asarray(cams, np.float32), lung_soft)
    return images + strength * trusted * (1.0 - images)


@register_mode("suppress")
def suppress(images, cams, lung_soft, strength, donor_films=None) -> np.ndarray:
    trusted = restrict(np.asarray(cams, np.float32), lung_soft)
    keep = lung_soft * (0.5 + 0.5 * trusted)  # lungs stay, brightest where the CAM points
    return images * (1.0 - strength * (1.0 - keep))


@register_mode("context_swap", needs_donor=True)
def context_swap(images, cams, lung_soft, strength, donor_films=None) -> np.ndarray:
    swapped = lung_soft * images + (1.0 - lung_soft) * donor_films
    return (1.0 - strength) * images + strength * swapped


def overlay(
    images: np.ndarray,
    cams: np.ndarray,
    lungs: np.ndarray,
    strength: float,
    mode: str,
    rng: np.random.Generator | None = None,
    dilate_px: int = 4,
    donors: np.ndarray | None = None,
    context: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Enhance a batch with a registered mode; returns (images, donors). A mode that needs a donor
    (context_swap) takes image i's context from `context[i]` when given (films chosen outside the
    batch), else from `images[donors[i]]` with donors drawn in the batch (returned; -1 where no
    donor was used)."""
    mode_fn, with_donor = ENHANCE_MODES.get(mode), needs_donor(mode)  # ValueError if unknown
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    no_donor = np.full(n, -1)
    if strength == 0.0:
        return images.copy(), no_donor
    lung_soft = soft_mask(np.asarray(lungs, bool), dilate_px)
    if not with_donor:
        return mode_fn(images, cams, lung_soft, strength, None), no_donor
    if context is not None:
        outside, donors = np.asarray(context, np.float32), no_donor
    else:
        if n < 2:
            return images.copy(), no_donor  # no other image to take context from
        rng = rng if rng is not None else np.random.default_rng()
        donors = derangement(n, rng) if donors is None else np.asarray(donors)
        outside = images[donors]
    return mode_fn(images, cams, lung_soft, strength, outside), donors


def lung_only(images: np.ndarray, lungs: np.ndarray, dilate_px: int = 4) -> np.ndarray:
    """The fallback for untrusted maps: lungs kept, everything else black."""
    return np.asarray(images, np.float32) * soft_mask(np.asarray(lungs, bool), dilate_px)


def enhance_batch(
    images: np.ndarray,
    cams: np.ndarray,
    lungs: np.ndarray,
    mode: str,
    strength: float,
    trust_threshold: float,
    fallback: str,
    rng: np.random.Generator,
    dilate_px: int = 4,
    context: np.ndarray | None = None,
) -> Enhanced:
    """Overlay every image, then apply the trust rule and its fallback."""
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; use one of {', '.join(FALLBACKS)}")
    images = np.asarray(images, np.float32)
    cams = np.asarray(cams, np.float32)
    lungs = np.asarray(lungs, bool)
    share = energy_share(cams, lungs)  # NaN for a flat map or no lungs found: untrusted
    trusted = np.nan_to_num(share, nan=0.0) >= trust_threshold
    out, donors = overlay(images, cams, lungs, strength, mode, rng, dilate_px, context=context)
    keep = np.ones(len(images), bool)
    untrusted = ~trusted
    if untrusted.any():
        if fallback == "original":
            out[untrusted] = images[untrusted]
        elif fallback == "lung_only":
            out[untrusted] = lung_only(images[untrusted], lungs[untrusted], dilate_px)
        else:
            keep[untrusted] = False
    return Enhanced(np.clip(out, 0.0, 1.0).astype(np.float32), keep, trusted, share, donors)
