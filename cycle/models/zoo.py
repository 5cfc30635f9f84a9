"""The classifier zoo: every architecture as `.features` (blocks) + `.head`, 1-channel input.

Contract: `model(x) == model.head(model.features(x))` for x of shape [N, 1, H, W]; the Grad-CAM
layer is the output of `.features`. `.features` is an nn.Sequential of blocks, so `unfreeze=k`
means "the last k blocks train" (0 = head only, "all" = everything).

Adding an architecture is one function decorated with `@register("name")`, returning a
`Classifier`: it is then a valid `model.arch` / `cycles.archs` value (cycle.registry).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from cycle.registry import ARCHITECTURES

CamMethod = str  # "gradcam" | "hirescam"


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but cannot be had (offline, no cached file, no weights)."""


class Classifier(nn.Module):
    def __init__(self, arch: str, blocks: list[nn.Module], head: nn.Module, cam_method: CamMethod):
        super().__init__()
        self.arch = arch
        self.features = nn.Sequential(*blocks)
        self.head = head
        # The faithful map for this head: Grad-CAM averages gradients over space, which is exact
        # for global-average-pool heads and hides *where* a Flatten+Linear head looks.
        self.cam_method = cam_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_blocks(self) -> int:
        return len(self.features)

    def set_unfreeze(self, unfreeze: int | str) -> Classifier:
        """Train the head and the last `unfreeze` feature blocks ("all": every parameter)."""
        if unfreeze == "all":
            n = self.num_blocks
        elif (
            isinstance(unfreeze, int)
            and not isinstance(unfreeze, bool)
            and 0 <= unfreeze <= self.num_blocks
        ):
            n = unfreeze
        else:
            raise ValueError(
                f"unfreeze={unfreeze!r} for {self.arch}: "
                f"use 'all' or an integer in 0..{self.num_blocks} "
                f"(number of trailing feature blocks that train; {self.arch} has {self.num_blocks})"
            )
        for i, block in enumerate(self.features):
            trainable = i >= self.num_blocks - n
            for p in block.parameters():
                p.requires_grad_(trainable)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.train(self.training)  # re-apply the frozen-BatchNorm rule
        return self

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # A frozen block's BatchNorm must not drift its running statistics during fine-tuning.
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


# ---------------------------------------------------------------------------------------------
# Registry

# A builder: (num_classes, image_size, dropout, pretrained, torchvision_state=None) -> Classifier.
Builder = Callable[..., Classifier]


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: the builder becomes architecture `name` (cycle.registry.ARCHITECTURES)."""
    return ARCHITECTURES.register(name)


def available_architectures() -> list[str]:
    return ARCHITECTURES.names()


def build_model(
    name: str,
    num_classes: int = 2,
    pretrained: bool = False,
    unfreeze: int | str = "all",
    image_size: int = 224,
    dropout: float = 0.3,
    weights_path: str | Path | None = None,
) -> Classifier:
    """Build a 1-channel classifier; `weights_path` loads a local state dict (weights_only)."""
    builder = ARCHITECTURES.get(name)  # ValueError naming the registered ones
    torchvision_state = None
    if weights_path is not None:
        state = load_state_dict(weights_path)
        if not any(k.startswith(("features.", "head.")) for k in state):
            torchvision_state, state = state, None  # an RGB torchvision checkpoint: adapt it below
    model = builder(
        num_classes=num_classes,
        image_size=image_size,
        dropout=dropout,
        pretrained=pretrained,
        torchvision_state=torchvision_state,
    )
    if weights_path is not None and torchvision_state is None:
        model.load_state_dict(state)
    return model.set_unfreeze(unfreeze)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare one, or our checkpoint's `model` entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return obj


# ---------------------------------------------------------------------------------------------
# Architectures


@register("tinyvgg")
def tinyvgg(num_classes, image_size, dropout, pretrained, torchvision_state=None) -> Classifier:
    """The original study's TinyVGG: 4 conv 3x3 layers of 15 channels, ReLU, max-pool, dropout."""
    if pretrained:
        raise PretrainedWeightsError("tinyvgg has no ImageNet weights; use pretrained=false")
    if torchvision_state is not None:
        raise ValueError(
            "tinyvgg weights must be a checkpoint of this project (keys features.*, head.*)"
        )
    if image_size % 4:
        raise ValueError(f"tinyvgg needs an image size divisible by 4, got {image_size}")
    width = 15

    def block(c_in: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    side = image_size // 4
    head = nn.Sequential(
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * side * side, num_classes)
    )
    return Classifier("tinyvgg", [block(1), block(width)], head, cam_method="hirescam")


def _vgg(
    name: str, num_classes, image_size, dropout, pretrained, torchvision_state=None
) -> Classifier:
    net = getattr(torchvision.models, name)()
    _load_torchvision(net, name, pretrained, torchvision_state)
    layers = list(net.features)
    layers[0] = _one_channel(layers[0])
    blocks, current = [], []
    for layer in layers:  # one block per resolution: split after each max-pool
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    classifier = list(net.classifier)
    classifier[2] = nn.Dropout(dropout)
    classifier[5] = nn.Dropout(dropout)
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
    head = nn.Sequential(net.avgpool, nn.Flatten(), *classifier)
    return Classifier(name, blocks, head, cam_method="hirescam")


def _resnet(
    name: str, num_classes, image_size, dropout, pretrained, torchvision_state=None
) -> Classifier:
    net = getattr(torchvision.models, name)()
    _load_torchvision(net, name, pretrained, torchvision_state)
    stem = nn.Sequential(_one_channel(net.conv1), net.bn1, net.relu, net.maxpool)
    blocks = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(net.fc.in_features, num_classes),
    )
    # Global average pool + linear: Grad-CAM and HiResCAM coincide.
    return Classifier(name, blocks, head, cam_method="gradcam")


for _name in ("vgg16", "vgg19"):
    register(_name)(partial(_vgg, _name))
for _name in ("resnet18", "resnet50", "resnet101", "resnet152"):
    register(_name)(partial(_resnet, _name))


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """RGB first conv -> grayscale: the sum of the RGB filters sees a gray image as RGB would."""
    new = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _load_torchvision(net: nn.Module, name: str, pretrained: bool, state: dict | None) -> None:
    if state is not None:
        net.load_state_dict(state)
    elif pretrained:
        net.load_state_dict(imagenet_state_dict(name))


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, OSError, hash mismatch: all mean "no weights here"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PretrainedWeightsError(
            f"cannot get ImageNet weights for {name} "
            f"({type(err).__name__}: {err}). This machine may "
            f"be offline. Either copy {weights.url} to {cache}, or pass a local file with "
            f"model.weights_path=PATH, or train from scratch with model.pretrained=false."
        ) from err
