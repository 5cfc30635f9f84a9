"""Dice + cross-entropy for the lung U-Net, as MONAI's `DiceCELoss(to_onehot_y=True,
softmax=True)` computes it with its defaults (kept in plain torch: see unet.py for why)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SMOOTH = 1e-5  # MONAI's smooth_nr and smooth_dr: an empty class in an empty target scores 1


class DiceCELoss(nn.Module):
    """`logits` (N, C, H, W) and integer `target` (N, 1, H, W): the soft Dice loss per film and
    class (background included), averaged, plus the mean cross-entropy."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target.squeeze(1).long()
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        dims = tuple(range(2, logits.ndim))
        overlap = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        dice = 1.0 - (2.0 * overlap + SMOOTH) / (total + SMOOTH)
        return dice.mean() + F.cross_entropy(logits, labels)
