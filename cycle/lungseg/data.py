"""Image + lung-mask pairs from the layouts a user will have.

- phantom:    the phantom tree (`chest_xray/masks/lungs/...` beside the films); the default
- montgomery: `CXR_png/*.png` + `ManualMask/leftMask/*.png` + `ManualMask/rightMask/*.png` (merged)
- jsrt:       JSRT films (`*.IMG` raw 2048x2048 12-bit, or PNG/JPEG) + SCR masks in
              `left lung/` and `right lung/` folders (GIF, any size; merged and resized)
- pairs:      any `images/` (or `CXR_png/`) folder + `masks/` folder matched by file stem; mask
              stems may end in `_mask`, `-mask` or `_seg` (Shenzhen's `CHNCXR_0001_0_mask.png`)
Pairs that cannot be matched or read are skipped with a reason.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cycle.data.phantom import mask_path
from cycle.data.records import Skipped, load_dataset
from cycle.data.transforms import IMAGE_EXTENSIONS, ImageLoadError, load_grayscale

JSRT_SIDE = 2048
_MASK_SUFFIX = re.compile(r"(?:[_-]mask|_seg)$", re.IGNORECASE)


class LungDataError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pair:
    image: str
    masks: tuple[str, ...]  # merged by union (left + right lung)
    split: str  # train, val, test
    group: str  # patient (phantoms) or file stem: what must not cross splits


def load_film(path: str | Path) -> np.ndarray:
    """Any film as uint8 grayscale, JSRT raw `.IMG` included."""
    path = Path(path)
    if path.suffix.lower() != ".img":
        return load_grayscale(path)
    raw = path.read_bytes()
    if len(raw) != JSRT_SIDE * JSRT_SIDE * 2:
        raise ImageLoadError(
            f"not a JSRT raw film: {len(raw):,} bytes, expected {JSRT_SIDE * JSRT_SIDE * 2:,}"
        )
    values = np.frombuffer(raw, dtype=">u2").reshape(JSRT_SIDE, JSRT_SIDE).astype(np.float32)
    # JSRT stores optical density (12 bit): bright bone is a low value, so invert for display.
    return np.round(255.0 * (1.0 - np.clip(values, 0, 4095) / 4095.0)).astype(np.uint8)


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(film uint8, mask bool of the film's size); raises ImageLoadError with a reason."""
    film = load_film(pair.image)
    mask = np.zeros(film.shape, bool)
    for path in pair.masks:
        try:
            part = load_grayscale(path) > 127
        except ImageLoadError as err:
            raise ImageLoadError(f"mask {Path(path).name}: {err.reason}") from None
        if part.shape != film.shape:
            part = (
                cv2.resize(
                    part.astype(np.uint8),
                    (film.shape[1], film.shape[0]),
                    interpolation=cv2.INTER_NEAREST,
                )
                > 0
            )
        mask |= part
    return film, mask


def detect_layout(root: str | Path) -> str:
    root = Path(root)
    dirs = {p.relative_to(root).as_posix().lower() for p in root.rglob("*") if p.is_dir()}
    names = {d.rsplit("/", 1)[-1] for d in dirs}
    if any(d.endswith("masks/lungs") for d in dirs) or (root / "chest_xray" / "masks").is_dir():
        return "phantom"
    if {"leftmask", "rightmask"} <= names:
        return "montgomery"
    if {"left lung", "right lung"} <= names:
        return "jsrt"
    if names & {"masks", "mask"} and names & {"images", "image", "cxr_png", "imgs"}:
        return "pairs"
    raise LungDataError(
        f"no lung-mask layout recognised under {root}: expected the phantom tree, Montgomery "
        "(CXR_png + ManualMask/leftMask, rightMask), JSRT/SCR ('left lung', 'right lung' mask "
        "folders) or an images/ + masks/ pair of folders"
    )


def find_pairs(
    root: str | Path,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[str, list[Pair], list[Skipped]]:
    root = Path(root)
    layout = detect_layout(root)
    if layout == "phantom":
        return layout, *_phantom_pairs(
            root, val_fraction, seed, cache_dir or root.parent / ".cache"
        )
    finder = {"montgomery": _montgomery, "jsrt": _jsrt, "pairs": _stem_pairs}[layout]
    matched, skipped = finder(root)
    if not matched:
        raise LungDataError(
            f"no image/mask pairs found under {root} ({layout} layout); {len(skipped)} skipped"
        )
    return layout, _assign_splits(matched, val_fraction, test_fraction, seed), skipped


def _phantom_pairs(
    root: Path, val_fraction: float, seed: int, cache_dir
) -> tuple[list[Pair], list[Skipped]]:
    tree = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    scan = load_dataset(tree, val_fraction, seed, cache_dir)
    pairs, skipped = [], list(scan.skipped)
    for record in scan.records:
        mask = mask_path(record.path, "lungs")
        if not mask.is_file():
            skipped.append(Skipped(record.path, "no lung mask beside the film"))
            continue
        if record.split == "test_cf":
            continue  # the same anatomy as test: one test split is enough for segmentation
        pairs.append(Pair(record.path, (str(mask),), record.split, record.patient))
    return pairs, skipped


def _images_under(folder: Path, exclude: frozenset[Path] = frozenset()) -> dict[str, Path]:
    """Image files under a folder by stem, skipping hidden files and the `exclude` folders."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if (
            p.is_file()
            and not p.name.startswith(".")
            and (p.suffix.lower() in IMAGE_EXTENSIONS or p.suffix.lower() == ".img")
            and not any(parent in exclude for parent in p.parents)
        ):
            found[p.stem] = p
    return found


def _find_dir(root: Path, *names: str) -> Path | None:
    wanted = {n.lower() for n in names}
    for path in sorted(root.rglob("*")):
        if path.is_dir() and path.name.lower() in wanted:
            return path
    return None


def _montgomery(root: Path) -> tuple[list[tuple[str, tuple[str, ...]]], list[Skipped]]:
    left, right = _find_dir(root, "leftMask"), _find_dir(root, "rightMask")
    images_dir = _find_dir(root, "CXR_png") or _find_dir(root, "images")
    if images_dir is None:
        raise LungDataError(f"Montgomery layout under {root} has no CXR_png/ folder")
    lefts, rights = _images_under(left), _images_under(right)
    pairs, skipped = [], []
    for stem, image in _images_under(images_dir).items():
        missing = [
            side for side, found in (("left", lefts), ("right", rights)) if stem not in found
        ]
        if missing:
            skipped.append(Skipped(str(image), f"no {' and '.join(missing)} lung mask"))
        else:
            pairs.append((str(image), (str(lefts[stem]), str(rights[stem]))))
    return pairs, skipped


def _jsrt(root: Path) -> tuple[list[tuple[str, tuple[str, ...]]], list[Skipped]]:
    left, right = _find_dir(root, "left lung"), _find_dir(root, "right lung")
    lefts, rights = _images_under(left), _images_under(right)
    films = _images_under(root, exclude=frozenset(_mask_folders(root)))
    pairs, skipped = [], []
    for stem, image in films.items():
        if stem in lefts and stem in rights:
            pairs.append((str(image), (str(lefts[stem]), str(rights[stem]))))
        else:
            skipped.append(Skipped(str(image), "no left and right lung masks with this name"))
    return pairs, skipped


def _mask_folders(root: Path) -> list[Path]:
    names = {"left lung", "right lung", "heart", "left clavicle", "right clavicle", "masks", "mask"}
    return [p for p in root.rglob("*") if p.is_dir() and p.name.lower() in names]


def _stem_pairs(root: Path) -> tuple[list[tuple[str, tuple[str, ...]]], list[Skipped]]:
    images_dir = _find_dir(root, "images", "image", "CXR_png", "imgs")
    masks_dir = _find_dir(root, "masks", "mask")
    masks: dict[str, Path] = {}
    for stem, path in _images_under(masks_dir).items():
        masks[_MASK_SUFFIX.sub("", stem)] = path
    pairs, skipped = [], []
    images = _images_under(images_dir)
    for stem, image in images.items():
        if stem in masks:
            pairs.append((str(image), (str(masks[stem]),)))
        else:
            skipped.append(Skipped(str(image), "no mask with this file name"))
    for stem, mask in masks.items():
        if stem not in images:
            skipped.append(Skipped(str(mask), "mask without an image"))
    return pairs, skipped


def _assign_splits(matched, val_fraction: float, test_fraction: float, seed: int) -> list[Pair]:
    """Deterministic split by group (file stem), so a rerun trains on the same files."""
    groups: dict[str, list] = defaultdict(list)
    for image, masks in matched:
        groups[Path(image).stem.upper()].append((image, masks))
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = max(1, round(test_fraction * len(names))) if len(names) >= 3 else 0
    n_val = max(1, round(val_fraction * len(names))) if len(names) >= 3 else 0
    pairs = []
    for rank, index in enumerate(order):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        for image, masks in groups[names[index]]:
            pairs.append(Pair(image, tuple(masks), split, names[index]))
    return pairs
