"""One registration adds an architecture or an enhancement mode everywhere: the config accepts
it, the evidence makes it a variant, and a cycle runs with it, without editing another file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch import nn

from cycle.config import ConfigError, load_config
from cycle.enhance import needs_donor, overlay, register_mode
from cycle.evidence import all_variants
from cycle.models import Classifier, available_architectures, build_model, register
from cycle.registry import ARCHITECTURES, ENHANCE_MODES, Registry
from cycle.runner import Runner

ROOT = Path(__file__).resolve().parent.parent
BUILTIN_ARCHS = ["tinyvgg", "vgg16", "vgg19", "resnet18", "resnet50", "resnet101", "resnet152"]
BUILTIN_MODES = ["highlight", "suppress", "context_swap"]


def tinyconv(num_classes, image_size, dropout, pretrained, torchvision_state=None) -> Classifier:
    """Two conv blocks and a global-average-pool head: the smallest net the contract allows."""
    blocks = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
    ]
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, num_classes)
    )
    return Classifier("tinyconv", blocks, head, cam_method="gradcam")


def mirror_context(images, cams, lung_soft, strength, donor_films=None):
    """The lungs kept, the context taken from the donor film mirrored left-right."""
    swapped = lung_soft * images + (1.0 - lung_soft) * donor_films[:, :, ::-1]
    return (1.0 - strength) * images + strength * swapped


@pytest.fixture
def registered():
    register("tinyconv")(tinyconv)
    register_mode("mirror_context", needs_donor=True)(mirror_context)
    try:
        yield
    finally:
        ARCHITECTURES.unregister("tinyconv")
        ENHANCE_MODES.unregister("mirror_context")
    assert available_architectures() == BUILTIN_ARCHS
    assert ENHANCE_MODES.names() == BUILTIN_MODES


def test_builtins_are_registered_where_they_are_defined():
    assert available_architectures() == BUILTIN_ARCHS == ARCHITECTURES.names()
    assert ENHANCE_MODES.names() == BUILTIN_MODES
    assert [needs_donor(m) for m in BUILTIN_MODES] == [False, False, True]
    assert list(all_variants()) == ["control", *BUILTIN_MODES]


def test_a_registry_checks_names_and_lists_the_available_ones():
    registry = Registry("widget", builtins="cycle.registry")  # imports fine, registers nothing
    registry.register("a", flag=True)(len)
    assert registry.get("a") is len and registry.info("a") == {"flag": True}
    with pytest.raises(ValueError, match=r"unknown widget 'b'; available: 'a'"):
        registry.check("b")
    registry.unregister("a")
    assert registry.names() == []


def test_the_config_imports_no_torch_until_it_validates_a_name():
    code = (
        "import sys; from cycle.config import Config, load_config; Config(); "
        "assert 'torch' not in sys.modules and 'cycle.models.zoo' not in sys.modules; "
        "load_config(None, ['model.arch=tinyvgg']); assert 'cycle.models.zoo' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_config_rejects_an_unregistered_name_listing_the_registered_ones(registered):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.arch=nonet", "cycles.archs=[tinyconv, nonet]", "enhance.mode=x"])
    message = str(err.value)
    assert "model.arch: unknown architecture 'nonet'; available: 'tinyvgg', 'vgg16'" in message
    assert "cycles.archs.1: unknown architecture 'nonet'" in message
    assert "'tinyconv'" in message  # the newly registered one is listed too
    assert "enhance.mode: unknown enhance mode 'x'; available: 'highlight'" in message
    assert "'mirror_context'" in message


def test_a_registered_name_is_valid_everywhere(registered):
    cfg = load_config(None, ["model.arch=tinyconv", "enhance.mode=mirror_context"])
    assert (cfg.model.arch, cfg.enhance.mode) == ("tinyconv", "mirror_context")
    assert build_model("tinyconv", image_size=32).num_blocks == 2
    assert all_variants()["mirror_context"] == {"enhance.mode": "mirror_context"}
    rng = np.random.default_rng(0)
    images = rng.random((3, 16, 16), dtype=np.float32)
    lungs = np.zeros((3, 16, 16), bool)
    out, donors = overlay(images, None, lungs, 1.0, "mirror_context", rng, dilate_px=0)
    assert sorted(donors) == [0, 1, 2] and all(donors != np.arange(3))  # a derangement
    np.testing.assert_allclose(out, images[donors][:, :, ::-1])  # no lungs: all context


@pytest.mark.slow
def test_a_cycle_runs_with_a_registered_architecture_and_mode(
    registered, smoke_assets, tmp_path, monkeypatch
):
    """In this process only (so the test's registrations are seen): training with
    num_workers=0, shards in-process, tracking off; Ray and MLflow made unimportable."""
    overrides = [s for s in smoke_assets if s != "--set"] + [
        f"output_dir={tmp_path}",
        "tracking.enabled=false",
        "resources.num_workers=0",
        "model.arch=tinyconv",
        "cycles.archs=[tinyconv]",
        "cycles.max=1",
        "cycles.epochs=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "enhance.mode=mirror_context",
    ]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    state = Runner(cfg, "registries", inprocess_shards=True).run()
    assert list(state.results) == ["tinyconv"] and len(state.results["tinyconv"]) == 2
    (manifest_path,) = (tmp_path / "registries").rglob("manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["mode"] == "mirror_context" and manifest["counts"]["written"] > 0
    donors = [
        d
        for part in sorted(manifest_path.parent.glob("*.parquet"))
        for d in pq.read_table(part, columns=["donor"]).column("donor").to_pylist()
    ]
    assert any(donors)  # needs_donor: each film's donor was read for the new mode
