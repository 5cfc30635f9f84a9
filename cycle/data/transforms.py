"""Images in, tensors out: load as 1-channel 8-bit, resize, the one center crop, normalise, augment.

The same `Preprocess` runs at train, eval and CAM time, so a CAM pixel maps to the same place of
the radiograph whichever stage made it. Geometry: resize the whole film to R x R with
R = round(size / crop_fraction), then cut the central size x size square.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch loads where tensors are made: decode tasks never need it
    import torch

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


class ImageLoadError(ValueError):
    """An image file that cannot be used; `reason` is a short, user-facing explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_grayscale(path: str | Path, max_pixels: int = 60_000_000) -> np.ndarray:
    """Fully decode an image file into a uint8 [H, W] array, whatever its mode or bit depth.

    Raises ImageLoadError with a reason for empty, non-image, truncated or oversized files.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageLoadError(f"unreadable: {err.strerror or err}") from None
    return decode_grayscale(data, max_pixels)


def decode_grayscale(data: bytes, max_pixels: int = 60_000_000) -> np.ndarray:
    """`load_grayscale` for bytes already in memory (Ray Data reads files as bytes)."""
    if len(data) == 0:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"too large: {width}x{height} = {width * height:,} pixels "
                    f"> limit {max_pixels:,}"
                )
            if width < 8 or height < 8:
                raise ImageLoadError(f"too small: {width}x{height} pixels")
            im.load()  # decode every byte: verify() alone misses truncated JPEGs
            im = ImageOps.exif_transpose(im)
            return to_uint8_gray(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not a decodable image") from None
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err) or type(err).__name__
        if "truncated" in message.lower():
            raise ImageLoadError(f"truncated image: {message}") from None
        raise ImageLoadError(f"corrupt image: {message}") from None


def to_uint8_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 grayscale. High-bit-depth films are windowed to their own range."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent = X-ray void
        im = Image.alpha_composite(background, im)
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8).copy()


@dataclass(frozen=True)
class Augment:
    """Label-preserving jitter for chest films: no horizontal flip (the heart is on one side)."""

    rotation_deg: float = 5.0
    translate: float = 0.04
    scale: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.pair(image, None, rng)[0]

    def pair(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The same geometry for an image and its mask (nearest neighbour); intensity: image
        only."""
        h, w = image.shape
        angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
        scale = 1.0 + rng.uniform(-self.scale, self.scale)
        matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
        matrix[:, 2] += rng.uniform(-self.translate, self.translate, size=2) * (w, h)
        warped = cv2.warpAffine(
            image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        ).astype(np.float32)
        if mask is not None:
            mask = (
                cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST) > 0
            )
        gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
        bias = 255.0 * rng.uniform(-self.brightness, self.brightness)
        mean = warped.mean()
        out = (warped - mean) * gain + mean + bias
        return np.clip(out, 0, 255).astype(np.uint8), mask


@dataclass(frozen=True)
class Preprocess:
    """uint8 [H, W] film -> normalised float tensor [1, size, size]."""

    size: int = 128
    crop_fraction: float = 0.875
    mean: float = 0.449
    std: float = 0.226

    @property
    def resize_to(self) -> int:
        return max(self.size, round(self.size / self.crop_fraction))

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Whole film -> R x R uint8 (the cacheable part: it does not depend on augmentation)."""
        r = self.resize_to
        if image.shape == (r, r):
            return image
        shrinking = image.shape[0] * image.shape[1] > r * r
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(image, (r, r), interpolation=interpolation)

    def crop(self, resized: np.ndarray) -> np.ndarray:
        off = (resized.shape[0] - self.size) // 2
        return resized[off : off + self.size, off : off + self.size]

    def normalise(self, crop: np.ndarray) -> torch.Tensor:
        """A uint8 crop [S, S] -> the network's input [1, S, S]."""
        return self._scaled(crop).unsqueeze(0)

    def normalise_batch(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 crops [N, S, S] -> [N, 1, S, S], each equal to `normalise` of its crop."""
        return self._scaled(crops).unsqueeze(1)

    def _scaled(self, pixels: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
        return tensor.sub_(self.mean).div_(self.std)

    def __call__(
        self,
        image: np.ndarray,
        augment: Augment | None = None,
        rng: np.random.Generator | None = None,
    ) -> torch.Tensor:
        resized = self.resize(image)
        if augment is not None:
            resized = augment(resized, rng if rng is not None else np.random.default_rng())
        return self.normalise(self.crop(resized))

    def crop_mask(self, mask: np.ndarray) -> np.ndarray:
        """The same geometry for a mask (nearest neighbour, stays binary)."""
        r = self.resize_to
        resized = cv2.resize(mask.astype(np.uint8), (r, r), interpolation=cv2.INTER_NEAREST)
        return self.crop(resized).astype(bool)

    def denormalise(self, tensor: torch.Tensor) -> torch.Tensor:
        """Normalised tensor -> [0, 1] floats, for pictures."""
        return (tensor * self.std + self.mean).clamp(0.0, 1.0)


def preprocess_from_config(data_cfg) -> Preprocess:
    return Preprocess(data_cfg.image_size, data_cfg.crop_fraction, data_cfg.mean, data_cfg.std)


def augment_from_config(augment_cfg) -> Augment | None:
    if not augment_cfg.enabled:
        return None
    return Augment(
        augment_cfg.rotation_deg,
        augment_cfg.translate,
        augment_cfg.scale,
        augment_cfg.brightness,
        augment_cfg.contrast,
    )
