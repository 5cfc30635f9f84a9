"""Class activation maps at the cost of one forward pass.

The gradient of a class logit with respect to the last feature map depends on the head alone, so
the engine runs `model.features` without autograd and only `model.head` with autograd, on the
detached feature map. A full `loss.backward()` through the network (what `pytorch-grad-cam`
does) computes every parameter's gradient only to throw it away.

One base class; each method overrides one function, `combine(activations, gradients)`:
- Grad-CAM: channel weights = gradients averaged over space. Exact for global-average-pool heads
  (ResNets), but it throws away *where* a Flatten+Linear head (TinyVGG, VGG) looks.
- HiResCAM: gradient x activation summed over channels, no spatial averaging: faithful for any
  head, and equal to Grad-CAM on global-average-pool heads.

Maps are: the class logit's CAM, ReLU, bilinear upsampling to `size`, each map min-max normalised
to [0, 1], all-zero where the map is flat (never NaN).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Target = int | Sequence[int] | torch.Tensor | None


class BaseCAM:
    name = "base"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] activations and gradients -> [N, h, w] raw map (before ReLU)."""
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        target: Target = None,
        size: tuple[int, int] | int | None = None,
        return_logits: bool = False,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        out_size = _pair(size) if size is not None else tuple(images.shape[-2:])
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # restored below, module by module: CAMs of a deterministic network
        try:
            # Works under callers' no_grad() and inference_mode(): only the head records a graph.
            with torch.inference_mode(False):
                with torch.no_grad():
                    activations = model.features(
                        images.clone() if images.is_inference() else images
                    )
                with torch.enable_grad():
                    leaf = activations.detach().requires_grad_(True)
                    logits = model.head(leaf)
                    classes = _targets(target, logits)
                    score = logits.gather(1, classes[:, None]).sum()
                    (gradients,) = torch.autograd.grad(score, leaf)  # never touches param.grad
                raw = self.combine(leaf.detach(), gradients)
                maps = normalise(upsample(F.relu(raw), out_size))
                logits = logits.detach()
        finally:
            for module, training in modes:
                module.training = training
        return (maps, logits) if return_logits else maps


class GradCAM(BaseCAM):
    name = "gradcam"

    def combine(self, activations, gradients):
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1)


class HiResCAM(BaseCAM):
    name = "hirescam"

    def combine(self, activations, gradients):
        return (gradients * activations).sum(dim=1)


METHODS: dict[str, BaseCAM] = {"gradcam": GradCAM(), "hirescam": HiResCAM()}


def grad_cam(
    model: nn.Module, images: torch.Tensor, target: Target = None, size=None, return_logits=False
):
    """Grad-CAM at the output of `model.features`: [N, H, W] in [0, 1] (see the module doc)."""
    return METHODS["gradcam"](model, images, target, size, return_logits)


def hires_cam(
    model: nn.Module, images: torch.Tensor, target: Target = None, size=None, return_logits=False
):
    """HiResCAM at the output of `model.features`; same signature and output as `grad_cam`."""
    return METHODS["hirescam"](model, images, target, size, return_logits)


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """`auto` = the faithful map for the architecture (the model's `cam_method`)."""
    if method == "auto":
        return getattr(model, "cam_method", "hirescam")
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; use auto, {', '.join(METHODS)}")
    return method


class EarlierLayer(nn.Module):
    """A classifier with its CAM layer moved `depth` feature blocks towards the input: the same
    function and weights (shared, not copied), a finer map (twice the resolution per ResNet
    block)."""

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        blocks = list(model.features)
        if not 0 < depth < len(blocks):
            raise ValueError(
                f"CAM depth {depth} is out of range: this model has {len(blocks)} feature blocks, "
                f"so use 0 to {len(blocks) - 1}"
            )
        self.features = nn.Sequential(*blocks[:-depth])
        self.head = nn.Sequential(*blocks[-depth:], model.head)
        self.cam_method = getattr(model, "cam_method", "hirescam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def at_depth(model: nn.Module, depth: int = 0) -> nn.Module:
    """`model` itself for depth 0 (the output of `.features`), else an EarlierLayer view."""
    return model if depth == 0 else EarlierLayer(model, depth)


# cam.depth=auto takes the last feature block whose map has at least this many cells a side: a
# coarser map cannot point inside a lesion (2% of a phantom film). resnet18 at 96 px maps 3 x 3
# at its last block; one block earlier (6 x 6) its pointing game after a context_swap cycle is
# 0.21 instead of 0.02 and its lung share 0.29 instead of 0.20, over 5 seeds (docs/evidence.md).
# TinyVGG's last block (24 x 24) already passes, and one earlier points worse (0.16 instead of
# 0.39). At 224 px every ResNet and VGG maps 7 x 7 at its last block, the layer Grad-CAM's
# authors use.
AUTO_MIN_SIDE = 6
_block_sides_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_depth(model: nn.Module, depth: int | str, images: torch.Tensor) -> int:
    """cam.depth as a number of blocks: an int as given; "auto" by the rule above, for images of
    this size."""
    if depth != "auto":
        return int(depth)
    sides = _block_sides(model, tuple(images.shape[1:]), images.dtype)
    return next((d for d in range(len(sides)) if sides[-1 - d] >= AUTO_MIN_SIDE), 0)


def _block_sides(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> list[int]:
    """The shorter side of each feature block's map for inputs of `shape` (one dummy image, in
    eval mode so that no BatchNorm statistics move; every module's mode is put back)."""
    known = _block_sides_cache.setdefault(model, {})
    if shape not in known:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        x = torch.zeros((1, *shape), dtype=dtype, device=next(model.parameters()).device)
        sides = []
        with torch.no_grad():
            for block in model.features:
                x = block(x)
                sides.append(min(x.shape[-2:]))
        for m, training in modes:
            m.training = training
        known[shape] = sides
    return known[shape]


def compute_cam(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "auto",
    target: Target = None,
    size=None,
    return_logits: bool = False,
    batch_size: int | None = None,
    depth: int | str = 0,
):
    """CAMs by method name, `depth` blocks before the end of `.features` ("auto": see
    resolve_depth). With `batch_size`, in chunks of exactly that many images (the last one
    padded): CPU convolutions round differently at different batch sizes, so a film's map must
    not depend on how many came with it."""
    model = at_depth(model, resolve_depth(model, depth, images))
    engine = METHODS[resolve_method(model, method)]
    if batch_size is None:
        return engine(model, images, target, size, return_logits)
    per_image = target is not None and not isinstance(target, int)
    maps, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        n = len(chunk)
        chunk_target = target[start : start + batch_size] if per_image else target
        if n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
            if per_image:
                chunk_target = list(chunk_target) + [0] * (batch_size - n)
        m, lg = engine(model, chunk, chunk_target, size, True)
        maps.append(m[:n])
        logits.append(lg[:n])
    maps_t, logits_t = torch.cat(maps), torch.cat(logits)
    return (maps_t, logits_t) if return_logits else maps_t


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a flat map (no evidence anywhere) is all zeros, not NaN."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    return torch.where(
        span > 0,
        (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny),
        torch.zeros_like(maps),
    )


def _targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    n, classes = logits.shape
    if target is None:
        chosen = logits.argmax(dim=1)
    elif isinstance(target, int):
        chosen = torch.full((n,), target, dtype=torch.long, device=logits.device)
    else:
        chosen = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
        if chosen.numel() != n:
            raise ValueError(f"{chosen.numel()} targets for {n} images")
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= classes):
        raise ValueError(f"target class out of range 0..{classes - 1}")
    return chosen


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
