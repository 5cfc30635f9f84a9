"""Lung segmentation: the U-Net, masks for films of any size, training on image + mask pairs, and
the lung model the cycle uses (configured, or trained once on the phantoms and cached)."""

from cycle.lungseg.masks import dice_iou, load_lung_model, postprocess, predict, save_lung_model
from cycle.lungseg.train import LungModelMissing, ensure_lung_model, evaluate_lungseg, train_lungseg
from cycle.lungseg.unet import build_unet

__all__ = [
    "LungModelMissing",
    "build_unet",
    "dice_iou",
    "ensure_lung_model",
    "evaluate_lungseg",
    "load_lung_model",
    "postprocess",
    "predict",
    "save_lung_model",
    "train_lungseg",
]
