"""The context-swap probe: how much a classifier's answer comes from outside the lungs. It needs
no lesion truth, so it measures shortcut reliance on real films too.

For each labelled film i, its (dilated) lungs are composed with the outside-lung context of a
film j of the *other* class (the `context_swap` operation of the enhancement, donors seeded), and
the classifier predicts:

- context_reliance: the prediction is j's label (0 = it reads only the lungs, 1 = only the
  context);
- lung_consistent_accuracy: the prediction is i's label, on the same composed films;
- seam_control_accuracy: the same composition with a donor of the *same* class, scored against
  i's label: what the seams alone cost (fine-tuning on composed films makes a model used to
  seams, so a fall in reliance is read beside this control);
- context_gap: seam control minus lung-consistent accuracy, i.e. accuracy when the context agrees
  with the lungs minus when it contradicts them: the probe's twin of the phantoms' counterfactual
  gap (test minus test_cf accuracy). Reliance alone is 0.5 for a model that composites merely
  confuse (a coin flip between lungs and context); the gap is 0 for it, as the truth is.

Per-film values (NaN where a film has no donor of the class needed), summarised by the caller with
bootstrap intervals. The donors depend on the labels and the seed only: every cycle and
architecture is probed with the same composed films, so their values pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from cycle.enhance import overlay

PROBE_METRICS = (
    "context_reliance",
    "lung_consistent_accuracy",
    "seam_control_accuracy",
    "context_gap",
)


def probe_donors(labels: np.ndarray, seed: int, same_class: bool) -> np.ndarray:
    """For each film, a donor of the other class (or of its own class, never itself), drawn
    uniformly with a seeded generator; -1 where there is none."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 71, int(same_class)])
    donors = np.full(len(labels), -1)
    for i, label in enumerate(labels):
        pool = np.flatnonzero(labels == label if same_class else labels != label)
        pool = pool[pool != i]
        if len(pool):
            donors[i] = pool[rng.integers(len(pool))]
    return donors


def compose(
    films: np.ndarray, lungs: np.ndarray, context: np.ndarray, dilate_px: int
) -> np.ndarray:
    """uint8 films [N, H, W]: film i's dilated lungs in context[i]'s outside-lung context,
    blended at the edge as the enhancement does, rounded to uint8 as enhanced shards are stored."""
    images = films.astype(np.float32) / 255.0
    composed, _ = overlay(
        images,
        None,
        lungs,
        1.0,
        "context_swap",
        dilate_px=dilate_px,
        context=context.astype(np.float32) / 255.0,
    )
    return np.round(np.clip(composed, 0.0, 1.0) * 255).astype(np.uint8)


@torch.no_grad()
def predicted_labels(
    model: nn.Module,
    films: np.ndarray,
    normalise: Callable[[np.ndarray], torch.Tensor],
    batch_size: int = 32,
) -> np.ndarray:
    """The classifier's label for each uint8 film, in batches of exactly `batch_size` (the last
    one padded): a film's answer must not depend on how many came with it."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a model without parameters: CPU
    out = []
    for start in range(0, len(films), batch_size):
        x = torch.stack([normalise(f) for f in films[start : start + batch_size]])
        n = len(x)
        if n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        out.append(model(x.to(device)).argmax(1)[:n].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, int)


def context_probe(
    model: nn.Module,
    films: np.ndarray,
    lungs: np.ndarray,
    labels: np.ndarray,
    normalise: Callable[[np.ndarray], torch.Tensor],
    seed: int,
    dilate_px: int = 4,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Per-film probe values (1.0 / 0.0, NaN without a donor) for the metrics in PROBE_METRICS,
    with every film in memory. `ContextProbe` gives the same values a chunk of films at a time."""
    probe = ContextProbe(labels, seed)
    for start in range(0, len(labels), batch_size):
        chunk = np.arange(start, min(start + batch_size, len(labels)))
        probe.add(
            model,
            chunk,
            films[chunk],
            lungs[chunk],
            films.__getitem__,
            normalise,
            dilate_px,
            batch_size,
        )
    return probe.values()


class ContextProbe:
    """The probe over a split read a chunk at a time: memory is a chunk's films, whatever the
    split's size. The donors are drawn from the labels once (`probe_donors`); each chunk's films
    are composed with their donors' context, which `context_of(indices)` reads (a donor may lie
    in any chunk: from disk again, never kept), and predicted."""

    def __init__(self, labels: np.ndarray, seed: int):
        self.labels = np.asarray(labels)
        self.donors = {same: probe_donors(self.labels, seed, same) for same in (False, True)}
        self.preds = {same: np.full(len(self.labels), -1) for same in (False, True)}

    def add(
        self,
        model: nn.Module,
        chunk: np.ndarray,
        films: np.ndarray,
        lungs: np.ndarray,
        context_of: Callable[[np.ndarray], np.ndarray],
        normalise: Callable[[np.ndarray], torch.Tensor],
        dilate_px: int,
        batch_size: int,
    ) -> None:
        """Films `chunk` (their indices in the split, at most `batch_size`), their uint8 crops and
        lung masks; predicted in one batch of exactly `batch_size` (padded)."""
        for same, donors in self.donors.items():
            mine = donors[chunk]
            has = mine >= 0
            if has.any():
                composed = compose(films[has], lungs[has], context_of(mine[has]), dilate_px)
                self.preds[same][chunk[has]] = predicted_labels(
                    model, composed, normalise, batch_size
                )

    def values(self) -> dict[str, np.ndarray]:
        labels, out = self.labels, {}
        for same, preds in self.preds.items():
            has = self.donors[same] >= 0
            right = np.where(has, (preds == labels).astype(np.float64), np.nan)
            if same:
                out["seam_control_accuracy"] = right
            else:
                donor_labels = labels[np.maximum(self.donors[same], 0)]
                out["context_reliance"] = np.where(
                    has, (preds == donor_labels).astype(np.float64), np.nan
                )
                out["lung_consistent_accuracy"] = right
        out["context_gap"] = context_gap(
            out["seam_control_accuracy"], out["lung_consistent_accuracy"]
        )
        return out


def context_gap(seam_control: np.ndarray, lung_consistent: np.ndarray) -> np.ndarray:
    """Per film: +1 where the agreeing context helps, -1 where it hurts; NaN where either
    composite is missing."""
    return np.asarray(seam_control, np.float64) - np.asarray(lung_consistent, np.float64)
