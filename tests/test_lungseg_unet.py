"""The lung U-Net and its loss in plain torch are MONAI's, number for number: lung models saved
by releases that used MONAI load unchanged and predict the same masks. The reference was made
once with monai 1.6.1 (tests/data/monai_unet_reference.json says how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cycle.lungseg.loss import DiceCELoss
from cycle.lungseg.unet import build_unet

REFERENCE = json.loads((Path(__file__).parent / "data" / "monai_unet_reference.json").read_text())


def test_state_dict_is_key_for_key_monais():
    ours = {k: list(v.shape) for k, v in build_unet().state_dict().items()}
    assert ours == REFERENCE["state_dict_shapes"]
    assert sum(p.numel() for p in build_unet().parameters()) == 1_625_161


def test_forward_matches_monais_output_for_the_same_weights():
    model = build_unet()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randn(2, 1, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    probe = REFERENCE["probe"]
    assert y.shape == (2, 2, 32, 48)
    assert y.sum().item() == pytest.approx(probe["output_sum"], rel=1e-4)
    assert y.abs().sum().item() == pytest.approx(probe["output_abs_sum"], rel=1e-4)
    assert y.flatten()[:8].tolist() == pytest.approx(probe["output_first"], rel=1e-4, abs=1e-5)


def test_dice_ce_is_near_zero_for_a_confident_right_answer_and_large_for_a_wrong_one():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6] = 1
    right = torch.where(target.bool(), 1.0, -1.0).repeat(1, 2, 1, 1) * 20
    right[:, 0] *= -1  # class 0 is confident where the target is 0
    loss = DiceCELoss()
    assert loss(right, target).item() < 1e-3
    assert loss(-right, target).item() > 1.9  # dice loss near 1, cross-entropy near 40
    # MONAI's value for this input (smooth 1e-5 on both sides of the Dice ratio)
    x = torch.zeros(2, 2, 8, 8)
    x[:, 0] = 20
    assert loss(x, torch.zeros_like(target)).item() == pytest.approx(0.0065098, rel=1e-4)


def test_the_unet_imports_without_monai():
    """`import monai` costs seconds in every process that segments lungs; nothing here needs it."""
    code = (
        "import sys, cycle.lungseg.train, cycle.lungseg.masks; "
        "assert 'monai' not in sys.modules, 'monai was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
