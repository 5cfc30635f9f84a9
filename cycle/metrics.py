"""Classification metrics over images (never averaged over batches). PNEUMONIA (1) is positive.

Logged per split (history.json, metrics.json, MLflow) as `{split}_loss`, `{split}_accuracy`,
`{split}_sensitivity`, `{split}_specificity`, `{split}_auc`: the names `prefixed` gives them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

METRIC_NAMES = ("loss", "accuracy", "sensitivity", "specificity", "auc")


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, losses: np.ndarray | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """labels: [N] in {0, 1}; probs: [N] P(PNEUMONIA); losses: [N] per-image loss (optional).

    Undefined values (sensitivity with no positives, AUC with one class) are NaN, never a crash.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} differ in shape")
    preds = (probs >= threshold).astype(np.int64)
    cm = confusion_matrix(labels, preds)
    (tn, fp), (fn, tp) = cm
    n = len(labels)
    return {
        "loss": float(np.mean(losses)) if losses is not None and n else math.nan,
        "accuracy": (tp + tn) / n if n else math.nan,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "auc": float(roc_auc_score(labels, probs)) if 0 < labels.sum() < n else math.nan,
        "n": n,
    }


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """[[TN, FP], [FN, TP]] (rows: true NORMAL, PNEUMONIA; columns: predicted)."""
    cm = np.zeros((2, 2), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def prefixed(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    return {f"{split}_{k}": float(v) for k, v in metrics.items() if k in METRIC_NAMES}


def format_table(rows: Mapping[str, Mapping[str, float]], columns=("n", *METRIC_NAMES)) -> str:
    """A plain-text table: one row per split."""
    header = ["split", *columns]
    lines = [header]
    for split, values in rows.items():
        cells = [split]
        for col in columns:
            value = values.get(col, math.nan)
            cells.append(
                f"{int(value)}" if col == "n" and not math.isnan(value) else f"{value:.4f}"
            )
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)
