"""Explain a user's own X-ray files: prediction, probability and a CAM overlay per image.

The map is computed on the model's input (the center crop) and drawn back onto the whole film;
the part of the film the model never saw is dimmed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from cycle.cam import compute_cam
from cycle.data.records import CLASSES
from cycle.data.transforms import IMAGE_EXTENSIONS, ImageLoadError, Preprocess, load_grayscale
from cycle.io import atomic_write_bytes, atomic_write_text
from cycle.localization import energy_share
from cycle.lungseg.masks import predict as predict_lungs

MAX_SIDE = 768  # overlays are for looking at, not for archiving


@dataclass
class Explained:
    path: str
    predicted: str
    probability: float  # P(predicted class)
    prob_pneumonia: float
    overlay: str
    lung_energy_share: float | None = None  # with a lung model: CAM mass inside the lungs


def list_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files and folders -> image files (recursively, hidden ones ignored) and problems."""
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.is_file() and not _hidden(p, item) and p.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        elif item.is_file():
            files.append(item)
        else:
            problems.append((str(item), "no such file or folder"))
    return files, problems


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def cam_on_film(cam: np.ndarray, film_shape: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """A CAM in crop coordinates -> the whole film's geometry (zero outside the crop)."""
    r, s = preprocess.resize_to, preprocess.size
    canvas = np.zeros((r, r), np.float32)
    off = (r - s) // 2
    canvas[off : off + s, off : off + s] = cam
    return cv2.resize(canvas, (film_shape[1], film_shape[0]), interpolation=cv2.INTER_LINEAR)


def overlay_png(
    film: np.ndarray, cam: np.ndarray, preprocess: Preprocess, caption: str, alpha: float = 0.45
) -> bytes:
    scale = min(1.0, MAX_SIDE / max(film.shape))
    size = (max(1, round(film.shape[1] * scale)), max(1, round(film.shape[0] * scale)))
    film_small = cv2.resize(film, size, interpolation=cv2.INTER_AREA)
    cam_small = cv2.resize(
        cam_on_film(cam, film.shape, preprocess), size, interpolation=cv2.INTER_LINEAR
    )
    heat = cv2.applyColorMap(
        np.clip(cam_small * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO
    )
    base = cv2.cvtColor(film_small, cv2.COLOR_GRAY2BGR)
    out = cv2.addWeighted(base, 1 - alpha, heat, alpha, 0)
    seen = cv2.resize(cam_on_film(np.ones_like(cam), film.shape, preprocess), size) > 0.5
    out[~seen] = (out[~seen] * 0.35).astype(np.uint8)  # outside the crop: the model never saw it
    cv2.rectangle(out, (0, 0), (min(size[0], 9 * len(caption) + 8), 22), (0, 0, 0), -1)
    cv2.putText(
        out, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA
    )
    ok, buf = cv2.imencode(".png", out)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def explain_files(
    model: torch.nn.Module,
    preprocess: Preprocess,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "auto",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress=None,
    lung_model: torch.nn.Module | None = None,
    depth: int | str = "auto",
) -> tuple[list[Explained], list[tuple[str, str]]]:
    """Write one overlay PNG per readable image and `predictions.csv`; return rows and skips.
    With `lung_model`, also each film's lung energy share (CAM and lungs on the whole film).
    `depth` is cam.depth (the default is the cycle's)."""
    out_dir = Path(out_dir)
    files, skipped = list_inputs(inputs)
    rows: list[Explained] = []
    used_names: set[str] = set()
    for batch in _batches(files, batch_size):
        films, paths = [], []
        for path in batch:
            try:
                films.append(load_grayscale(path))
                paths.append(path)
            except ImageLoadError as err:
                skipped.append((str(path), err.reason))
        if not films:
            continue
        tensors = torch.stack([preprocess(f) for f in films]).to(device)
        cams, logits = compute_cam(model, tensors, method, return_logits=True, depth=depth)
        probs = logits.softmax(dim=1)[:, 1].cpu().numpy()
        lungs = predict_lungs(lung_model, films) if lung_model is not None else [None] * len(films)
        for film, path, cam, p, lung in zip(films, paths, cams.cpu().numpy(), probs, lungs):
            pred = int(p >= 0.5)
            confidence = float(p if pred else 1 - p)
            name = _unique_name(path, used_names)
            png = overlay_png(film, cam, preprocess, f"{CLASSES[pred]} {confidence:.2f}")
            overlay = atomic_write_bytes(out_dir / "overlays" / name, png)
            share = None
            if lung is not None:
                value = float(energy_share(cam_on_film(cam, film.shape, preprocess), lung)[0])
                share = None if np.isnan(value) else value  # no lungs found, or a flat map
            rows.append(
                Explained(str(path), CLASSES[pred], confidence, float(p), str(overlay), share)
            )
        if progress is not None:
            progress(len(rows), len(files))
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["path", "predicted", "probability", "prob_pneumonia", "overlay"]
    writer.writerow(header + (["lung_energy_share"] if lung_model is not None else []))
    for row in rows:
        cells = [
            row.path,
            row.predicted,
            f"{row.probability:.6f}",
            f"{row.prob_pneumonia:.6f}",
            row.overlay,
        ]
        if lung_model is not None:
            cells.append("" if row.lung_energy_share is None else f"{row.lung_energy_share:.6f}")
        writer.writerow(cells)
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
    if skipped:
        atomic_write_text(
            out_dir / "skipped.csv", "path,reason\n" + "".join(f'"{p}","{r}"\n' for p, r in skipped)
        )
    return rows, skipped


def _unique_name(path: Path, used: set[str]) -> str:
    name = f"{path.stem}.png"
    k = 1
    while name in used:
        name = f"{path.stem}_{k}.png"
        k += 1
    used.add(name)
    return name
