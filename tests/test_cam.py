import pytest
import torch
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cycle.cam import (
    at_depth,
    compute_cam,
    grad_cam,
    hires_cam,
    normalise,
    resolve_depth,
    resolve_method,
)
from cycle.models import build_model

ARCHS = ["tinyvgg", "vgg16", "vgg19", "resnet18", "resnet50", "resnet101", "resnet152"]
SIZE = 64


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 1, SIZE, SIZE)


def _peer(peer_cls, model, images, targets):
    with peer_cls(model=model, target_layers=[model.features]) as cam:
        return torch.from_numpy(
            cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_grad_cam_equals_pytorch_grad_cam_with_mixed_targets(arch, batch):
    torch.manual_seed(1)
    model = build_model(arch, image_size=SIZE).eval()
    targets = [0, 1, 1, 0]
    ours = grad_cam(model, batch, target=targets)
    peer = _peer(GradCAM, model, batch, targets)
    assert ours.shape == peer.shape == (4, SIZE, SIZE)
    assert (ours - peer).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["tinyvgg", "vgg16", "resnet18"])
def test_hires_cam_equals_pytorch_grad_cam(arch, batch):
    torch.manual_seed(2)
    model = build_model(arch, image_size=SIZE).eval()
    targets = [1, 0, 1, 0]
    ours = hires_cam(model, batch, target=targets)
    peer = _peer(HiResCAM, model, batch, targets)
    assert (ours - peer).abs().max() <= 1e-4


def test_gradcam_and_hirescam_coincide_on_global_pool_heads(batch):
    model = build_model("resnet18", image_size=SIZE).eval()
    torch.testing.assert_close(
        grad_cam(model, batch, target=1), hires_cam(model, batch, target=1), atol=1e-5, rtol=0
    )


def test_default_target_is_the_predicted_class_and_logits_come_from_the_same_pass(batch):
    model = build_model("tinyvgg", image_size=SIZE).eval()
    maps, logits = grad_cam(model, batch, return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(batch))
    torch.testing.assert_close(maps, grad_cam(model, batch, target=logits.argmax(1).tolist()))


def test_no_side_effects_on_the_model(batch):
    model = build_model("resnet18", image_size=SIZE, unfreeze=1).train()
    modes = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    with torch.no_grad():  # callers under no_grad still get maps
        grad_cam(model, batch)
    with torch.inference_mode():
        hires_cam(model, batch)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == hooks


def test_maps_are_normalised_and_flat_maps_are_zero():
    maps = normalise(
        torch.stack([torch.zeros(5, 5), torch.full((5, 5), 3.0), torch.arange(25.0).reshape(5, 5)])
    )
    assert torch.isfinite(maps).all()
    assert maps[0].eq(0).all() and maps[1].eq(0).all()
    assert maps[2].min() == 0 and maps[2].max() == 1


def test_dead_relu_gives_zero_maps_not_nan(batch):
    model = build_model("tinyvgg", image_size=SIZE).eval()
    with torch.no_grad():
        for p in model.features.parameters():
            p.zero_()
    maps = grad_cam(model, batch)
    assert torch.isfinite(maps).all() and maps.eq(0).all()


def test_size_and_batching(batch):
    model = build_model("resnet18", image_size=SIZE).eval()
    assert grad_cam(model, batch, size=(20, 30)).shape == (4, 20, 30)
    whole = compute_cam(model, batch, target=[0, 1, 0, 1])
    chunked = compute_cam(model, batch, target=[0, 1, 0, 1], batch_size=3)
    torch.testing.assert_close(whole, chunked)


def test_method_resolution():
    assert resolve_method(build_model("tinyvgg", image_size=SIZE)) == "hirescam"
    assert resolve_method(build_model("resnet18", image_size=SIZE)) == "gradcam"
    assert resolve_method(build_model("resnet18", image_size=SIZE), "hirescam") == "hirescam"
    with pytest.raises(ValueError, match="unknown CAM method"):
        resolve_method(build_model("resnet18", image_size=SIZE), "scorecam")


def test_bad_targets_are_refused(batch):
    model = build_model("tinyvgg", image_size=SIZE).eval()
    with pytest.raises(ValueError, match="targets for 4 images"):
        grad_cam(model, batch, target=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, batch, target=2)


def test_hirescam_shows_where_a_flatten_head_looks():
    # Feature channel 0 is 1 everywhere; the Flatten+Linear head reads it at one location only.
    # HiResCAM must peak there; Grad-CAM's spatial average makes the map flat (it hides *where*).
    model = build_model("tinyvgg", image_size=16, dropout=0.0).eval()
    side = 4
    with torch.no_grad():
        last_conv = model.features[-1][2]
        last_conv.weight.zero_()
        last_conv.bias.zero_()
        last_conv.bias[0] = 1.0
        linear = model.head[-1]
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1, 0 * side * side + 1 * side + 2] = 1.0  # channel 0, row 1, column 2
    x = torch.rand(2, 1, 16, 16)
    hires = hires_cam(model, x, target=1, size=(side, side))
    expected = torch.zeros(side, side)
    expected[1, 2] = 1.0
    for m in hires:
        torch.testing.assert_close(m, expected)
    assert grad_cam(model, x, target=1, size=(side, side)).eq(0).all()


@pytest.mark.parametrize("arch, depth", [("resnet18", 1), ("resnet50", 2), ("vgg16", 1)])
def test_a_cam_one_block_earlier_equals_the_peer_on_that_layer(arch, depth):
    """cam.depth moves the map towards the input without copying or changing the network."""
    torch.manual_seed(2)
    model = build_model(arch, image_size=128).eval()
    images = torch.randn(3, 1, 128, 128)
    targets = [1, 0, 1]
    ours = compute_cam(model, images, method="gradcam", target=targets, depth=depth)
    with GradCAM(model=model, target_layers=[model.features[-1 - depth]]) as cam:
        peer = torch.from_numpy(
            cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
        )
    assert (ours - peer).abs().max() <= 1e-4
    view = at_depth(model, depth)
    with torch.no_grad():
        torch.testing.assert_close(view(images), model(images))  # the same function, shared weights
        assert view.features(images).shape[-1] == model.features(images).shape[-1] * 2**depth
    assert all(p is q for p, q in zip(view.parameters(), model.parameters()))


def test_an_impossible_cam_depth_names_the_range():
    model = build_model("tinyvgg", image_size=SIZE)
    with pytest.raises(
        ValueError, match="out of range: this model has 2 feature blocks, so use 0 to 1"
    ):
        compute_cam(model, torch.randn(1, 1, SIZE, SIZE), depth=2)
    assert at_depth(model, 0) is model


@pytest.mark.parametrize(
    "arch, size, expected",
    [
        ("resnet18", 96, 1),
        ("resnet18", 224, 0),
        ("tinyvgg", 96, 0),
        ("vgg16", 96, 1),
        ("resnet50", 64, 2),
    ],
)
def test_auto_depth_takes_the_last_block_whose_map_is_at_least_six_cells(arch, size, expected):
    torch.manual_seed(0)
    model = build_model(arch, image_size=size)  # in training mode, as a training loop holds it
    images = torch.randn(2, 1, size, size)
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert resolve_depth(model, "auto", images) == expected
    assert model.training and all(m.training for m in model.modules())  # modes put back
    moved = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, moved))  # the dummy pass left no trace
    assert resolve_depth(model, 0, images) == 0 and resolve_depth(model, 1, images) == 1
    model.eval()
    torch.testing.assert_close(
        compute_cam(model, images, depth="auto"), compute_cam(model, images, depth=expected)
    )
