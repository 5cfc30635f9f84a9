import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from cycle.models import PretrainedWeightsError, available_architectures, build_model

ARCHS = ["tinyvgg", "vgg16", "vgg19", "resnet18", "resnet50", "resnet101", "resnet152"]
SIZE = 64


def test_registry_lists_the_zoo():
    assert available_architectures() == ARCHS


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_model(name, image_size=SIZE).eval() for name in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_features_head_contract(models, arch):
    model = models[arch]
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
        assert logits.shape == (3, 2)
        assert features.ndim == 4 and features.shape[0] == 3
        torch.testing.assert_close(model.head(features), logits)
    assert model.cam_method in ("gradcam", "hirescam")


@pytest.mark.parametrize(
    "arch, blocks", [("tinyvgg", 2), ("vgg16", 5), ("resnet18", 5), ("resnet50", 5)]
)
def test_unfreeze_trains_the_trailing_blocks_and_the_head(arch, blocks):
    model = build_model(arch, image_size=SIZE, unfreeze=1)
    assert model.num_blocks == blocks
    for i, block in enumerate(model.features):
        expected = i == blocks - 1
        assert all(p.requires_grad == expected for p in block.parameters())
    assert all(p.requires_grad for p in model.head.parameters())

    head_only = build_model(arch, image_size=SIZE, unfreeze=0)
    assert not any(p.requires_grad for p in head_only.features.parameters())
    everything = build_model(arch, image_size=SIZE, unfreeze="all")
    assert all(p.requires_grad for p in everything.parameters())


def test_unfreeze_out_of_range_is_explained():
    with pytest.raises(ValueError, match=r"0\.\.5"):
        build_model("resnet18", image_size=SIZE, unfreeze=6)


def test_frozen_batchnorm_stays_frozen_in_train_mode():
    torch.manual_seed(0)
    model = build_model("resnet18", image_size=SIZE, unfreeze=1).train()
    frozen_bn = model.features[0][1]  # the stem's BatchNorm
    live_bn = model.features[4][0].bn1  # layer4's
    assert not frozen_bn.training and live_bn.training
    before = frozen_bn.running_mean.clone()
    live_before = live_bn.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 1, SIZE, SIZE) * 3 + 1).sum()
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(frozen_bn.running_mean, before)  # statistics did not drift
    assert not torch.equal(live_bn.running_mean, live_before)
    assert model.features[0][0].weight.grad is None  # frozen conv got no gradient
    model.eval().train()  # toggling mode keeps the rule
    assert not frozen_bn.training


def test_first_conv_is_the_sum_of_the_rgb_filters(tmp_path):
    # An RGB torchvision checkpoint on a gray film must see what the RGB net sees on gray RGB.
    rgb = torchvision.models.resnet18().eval()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    gray = build_model("resnet18", image_size=SIZE, weights_path=tmp_path / "rgb.pt").eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.features(x), nn.Sequential(*list(rgb.children())[:-2])(x.repeat(1, 3, 1, 1))
        )


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model("tinyvgg", image_size=SIZE)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = build_model("tinyvgg", image_size=SIZE, weights_path=tmp_path / "ckpt.pt")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError):
        build_model("tinyvgg", image_size=SIZE, weights_path=tmp_path / "missing.pt")


def test_pretrained_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    """Force the fault where torchvision really downloads, not only on an offline machine."""
    # An empty weights cache: a cached resnet18 file must not make this pass without the fault.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # set_dir() would override TORCH_HOME
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline")

    # WeightsEnum.get_state_dict calls the name imported into torchvision.models._api,
    # not torch.hub.load_state_dict_from_url: patch it there.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError) as err:
        build_model("resnet18", pretrained=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    assert calls == [url]  # the fake was really hit
    assert isinstance(err.value.__cause__, urllib.error.URLError)
    # The clear message: which model, where to put the file, and the other ways out.
    message = str(err.value)
    cache = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    assert "resnet18" in message and "offline" in message
    assert url in message and str(cache) in message
    assert "model.weights_path" in message and "model.pretrained=false" in message


def test_pretrained_tinyvgg_is_refused():
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights"):
        build_model("tinyvgg", pretrained=True)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="available"):
        build_model("alexnet")
