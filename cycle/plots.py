"""Pictures people would rather look at than read: CAM grids, before/after, confusion matrices,
per-cycle curves. Every function writes a PNG atomically and returns its path."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # headless: servers, CI, Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cycle.data.records import CLASSES  # noqa: E402
from cycle.io import atomic_write, atomic_write_bytes  # noqa: E402

CMAP = "inferno"  # perceptually uniform, readable in grayscale print
CONFIDENT = 0.9


def _save(fig, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def _grid(n: int, cols: int | None = None) -> tuple[int, int]:
    cols = cols or math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def cam_grid(
    images: np.ndarray,
    cams: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    title: str = "",
    alpha: float = 0.45,
    cols: int | None = None,
    tile: int = 192,
) -> Path:
    """Films with their CAM overlaid; corner: predicted class and P(class).

    Frame colour: green = correct and confident (P >= 0.9), white = correct, red = wrong (every
    panel shows its map: a wrong prediction's map is the one worth seeing). Drawn with OpenCV,
    each film scaled to `tile` pixels: a 49-film grid in tens of milliseconds.
    images: [N, H, W] in [0, 1]; cams: [N, H, W] in [0, 1]; probs: [N] P(PNEUMONIA).
    """
    rows, cols = _grid(len(images), cols)
    tiles = []
    for image, cam, prob, label in zip(images, cams, probs, labels):
        over = _overlay(image, cam, alpha, tile)
        pred = int(prob >= 0.5)
        confidence = prob if pred else 1 - prob
        correct = pred == int(label)
        colour = (GREEN if confidence >= CONFIDENT else WHITE) if correct else RED
        _label(over, f"{CLASSES[pred][:4]} {confidence:.2f}", (3, 3), colour, (0, 0, 0))
        if not correct:
            _label(over, f"true {CLASSES[int(label)][:4]}", (3, tile - 17), None, WHITE)
        tiles.append(cv2.copyMakeBorder(over, 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=colour))
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (rows * cols - len(tiles))
    sheet = np.concatenate(
        [np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    )
    if title:
        header = np.full((28, sheet.shape[1], 3), 255, np.uint8)
        _text(header, title, (6, 19), (0, 0, 0), 0.55)
        sheet = np.concatenate([header, sheet], axis=0)
    return atomic_write_bytes(path, cv2.imencode(".png", sheet)[1].tobytes())


# BGR, for OpenCV
GREEN, WHITE, RED = (64, 204, 46), (255, 255, 255), (54, 65, 255)


def _overlay(image: np.ndarray, cam: np.ndarray | None, alpha: float, size: int) -> np.ndarray:
    """The film in BGR with the CAM blended over it (the film alone for cam None), `size` px."""
    blended = cv2.cvtColor(np.clip(image * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    if cam is not None:
        heat = cv2.applyColorMap(np.clip(cam * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        blended = cv2.addWeighted(blended, 1 - alpha, heat, alpha, 0)
    return cv2.resize(blended, (size, size), interpolation=cv2.INTER_LINEAR)


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], colour, scale: float = 0.42):
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], box, colour) -> None:
    """`text` at `corner` (its top left), on a filled box of colour `box` where given."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1)
    x, y = corner
    if box is not None:
        cv2.rectangle(canvas, (x, y), (x + w + 4, y + h + base + 3), box, thickness=-1)
    _text(canvas, text, (x + 2, y + h + 2), colour)


def before_after_grid(
    images: np.ndarray,
    cams_before: np.ndarray,
    cams_after: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    names: tuple[str, str] = ("before", "after"),
    alpha: float = 0.45,
    lungs: np.ndarray | None = None,
    tile: int = 160,
) -> Path:
    """Rows of (film, CAM before, CAM after) for the same images; lung outline where given.
    Drawn with OpenCV like `cam_grid` (matplotlib took seconds of the driver's CPU a picture)."""
    rows = []
    for i in range(len(images)):
        cells = [
            _overlay(images[i], cam, alpha, tile) for cam in (None, cams_before[i], cams_after[i])
        ]
        if lungs is not None:
            outline = cv2.resize(
                lungs[i].astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST
            )
            contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for cell in cells:
                cv2.drawContours(cell, contours, -1, (204, 204, 57), 1, cv2.LINE_AA)
        if labels is not None:
            _text(cells[0], CLASSES[int(labels[i])][:4], (4, 14), (0, 255, 255))
        rows.append(np.concatenate([_pad(c) for c in cells], axis=1))
    sheet = np.concatenate(rows, axis=0)
    header = np.full((24, sheet.shape[1], 3), 255, np.uint8)
    for j, name in enumerate(("film", *names)):
        _text(header, name, (j * (tile + 2) + 6, 17), (0, 0, 0), 0.5)
    return atomic_write_bytes(
        path, cv2.imencode(".png", np.concatenate([header, sheet], axis=0))[1].tobytes()
    )


def _pad(cell: np.ndarray) -> np.ndarray:
    return cv2.copyMakeBorder(cell, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=WHITE)


def confusion_matrix_plot(cm: Sequence[Sequence[int]], path: str | Path, title: str = "") -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.2, 2.9))
    ax.imshow(cm, cmap="Blues")
    total = max(int(cm.sum()), 1)
    for (r, c), value in np.ndenumerate(cm):
        ax.text(
            c,
            r,
            f"{value}\n{value / total:.0%}",
            ha="center",
            va="center",
            color="white" if value > cm.max() / 2 else "black",
            fontsize=9,
        )
    ax.set_xticks([0, 1], [f"pred {c[:4]}" for c in CLASSES])
    ax.set_yticks([0, 1], [f"true {c[:4]}" for c in CLASSES])
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def roc_pr_plot(
    scored: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = ""
) -> Path:
    """ROC and precision-recall curves, one line per split: {split: (labels, P(PNEUMONIA))}.
    A split with one class only has no curve (and says so in the legend)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(7.4, 3.4))
    for split, (labels, probs) in scored.items():
        labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
        if not 0 < labels.sum() < len(labels):
            roc.plot([], [], label=f"{split}: one class only")
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        precision, recall, _ = precision_recall_curve(labels, probs)
        roc.plot(fpr, tpr, label=f"{split} (AUC {auc(fpr, tpr):.3f})")
        pr.plot(recall, precision, label=f"{split} (base {labels.mean():.2f})")
    roc.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="precision-recall")
    for ax in (roc, pr):
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="lower right" if ax is roc else "lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def cycle_curves(
    per_cycle: Mapping[str, Sequence[Mapping[str, float]]],
    metrics: Sequence[str],
    path: str | Path,
    intervals: bool = True,
) -> Path:
    """One panel per metric; x = cycle (0 = baseline), one line per architecture.
    per_cycle: {arch: [{metric: value, metric_ci_low: ..., metric_ci_high: ...}, ...]}."""
    rows, cols = _grid(len(metrics), min(3, len(metrics)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(metrics) :]:
        ax.set_axis_off()
    for ax, metric in zip(axes.ravel(), metrics):
        for arch, cycles in per_cycle.items():
            x = np.arange(len(cycles))
            y = np.array([c.get(metric, np.nan) for c in cycles], dtype=float)
            ax.plot(x, y, marker="o", label=arch)
            low = np.array([c.get(f"{metric}_ci_low", np.nan) for c in cycles], dtype=float)
            high = np.array([c.get(f"{metric}_ci_high", np.nan) for c in cycles], dtype=float)
            if intervals and np.isfinite(low).any():
                ax.fill_between(x, low, high, alpha=0.2)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("cycle", fontsize=8)
        ax.set_xticks(range(max(len(c) for c in per_cycle.values())))
        ax.grid(alpha=0.3)
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def mask_comparison(films, truths, preds, path: str | Path, cols: int = 4) -> Path:
    """Predicted vs true lung masks: green = both, red = missed (false negative),
    blue = extra (false positive); Dice in the corner."""
    n = len(films)
    rows, cols = _grid(n, min(cols, n))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, film, truth, pred in zip(axes.ravel(), films, truths, preds):
        rgb = np.repeat(film[..., None] / 255.0, 3, axis=2) * 0.7
        both, missed, extra = truth & pred, truth & ~pred, pred & ~truth
        rgb[both] = rgb[both] * 0.5 + np.array([0.2, 0.6, 0.2])
        rgb[missed] = np.array([0.9, 0.15, 0.15])
        rgb[extra] = np.array([0.2, 0.4, 1.0])
        dice = 2 * both.sum() / max(truth.sum() + pred.sum(), 1)
        ax.imshow(np.clip(rgb, 0, 1))
        ax.text(
            3,
            3,
            f"Dice {dice:.3f}",
            color="white",
            fontsize=7,
            va="top",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0},
        )
    fig.subplots_adjust(wspace=0.03, hspace=0.03)
    return _save(fig, path)


def enhanced_grid(
    originals, cams, enhanced, path: str | Path, cols: int | None = None, alpha: float = 0.45
) -> Path:
    """Triplets (film, film + CAM, enhanced film) under a header naming the three; arrays
    [N, H, W] in [0, 1]. `cols` triplets a row, by default as many as keep the sheet about
    square (9 films: 2 a row, not one long strip). Drawn with OpenCV: 49 triplets in
    milliseconds."""
    tiles = []
    for film, cam, out in zip(originals, cams, enhanced):
        gray = cv2.cvtColor(np.clip(film * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        heat = cv2.applyColorMap(np.clip(cam * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
        over = cv2.addWeighted(gray, 1 - alpha, heat, alpha, 0)
        after = cv2.cvtColor(np.clip(out * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        tile = np.concatenate([gray, over, after], axis=1)
        tiles.append(np.pad(tile, ((3, 3), (3, 3), (0, 0)), constant_values=40))
    cols = cols or max(1, round(math.sqrt(len(tiles) / 3)))  # a triplet is 3 films wide
    cols = min(cols, len(tiles))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + cols], axis=1) for r in range(0, len(tiles), cols)]
    sheet = np.concatenate([_triplet_header(tiles[0].shape[1], cols), *rows], axis=0)
    ok, png = cv2.imencode(".png", sheet)
    return atomic_write_bytes(path, png.tobytes())


def _triplet_header(tile_width: int, cols: int, height: int = 22) -> np.ndarray:
    header = np.full((height, tile_width * cols, 3), 40, np.uint8)
    third = (tile_width - 6) // 3
    for c in range(cols):
        for j, label in enumerate(("film", "CAM", "enhanced")):
            x = c * tile_width + 3 + j * third + 4
            cv2.putText(
                header,
                label,
                (x, height - 7),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.45,
                (230, 230, 230),
                1,
                cv2.LINE_AA,
            )
    return header


def sweep_scatter(
    rows: Sequence[Mapping], keys: Sequence[str], objective: str, path: str | Path
) -> Path:
    """One panel per swept setting: each trial's value against its objective (categories spread
    on the x axis); trials stopped early by ASHA hollow."""
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [row["values"][key] for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = np.array(values, dtype=float)
        else:
            labels = sorted({str(v) for v in values})
            xs = np.array([labels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ys = np.array([row["objective"] for row in rows], dtype=float)
        done = np.array([row["status"] == "finished" for row in rows])
        ax.scatter(xs[done], ys[done], c="tab:blue", label="finished")
        ax.scatter(
            xs[~done], ys[~done], facecolors="none", edgecolors="tab:red", label="stopped early"
        )
        if numeric and len(xs) and xs.min() > 0 and xs.max() / xs.min() > 50:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(objective)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("sweep: settings vs objective (val)")
    fig.tight_layout()
    return _save(fig, path)


def probe_vs_truth(points: Sequence[Mapping], rhos: Mapping[str, float], path: str | Path) -> Path:
    """The context-swap probe against the phantom truth it must track: each evaluated (arch,
    seed, variant, cycle) as a point, one panel per probe metric in `rhos` (its Spearman rho in
    the title), counterfactual gap (test minus cf accuracy) on y; one colour per variant, one
    marker per architecture; the dashed line is y = x."""
    fig, axes = plt.subplots(
        1, len(rhos), figsize=(5.0 * len(rhos), 4.2), sharey=True, squeeze=False
    )
    variants = sorted({p["variant"] for p in points})
    archs = sorted({p["arch"] for p in points})
    markers = "osD^v<>"
    for ax, (metric, rho) in zip(axes[0], rhos.items()):
        for vi, variant in enumerate(variants):
            for ai, arch in enumerate(archs):
                chosen = [p for p in points if p["variant"] == variant and p["arch"] == arch]
                if chosen:
                    ax.scatter(
                        [p.get(metric, np.nan) for p in chosen],
                        [p["cf_gap"] for p in chosen],
                        color=plt.cm.tab10(vi),
                        marker=markers[ai % len(markers)],
                        label=f"{arch} · {variant}",
                        alpha=0.8,
                    )
        ax.plot([0, 1], [0, 1], "--", color="0.6", lw=0.8)
        ax.set_xlabel(f"{metric} (probe, test)")
        ax.set_title(f"Spearman ρ = {rho:.2f} over {len(points)} cells")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test acc − test_cf acc (truth)")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, path)
