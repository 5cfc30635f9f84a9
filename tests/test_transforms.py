import numpy as np
import torch

from cycle.data.transforms import Augment, Preprocess


def test_preprocess_geometry_and_normalisation():
    pre = Preprocess(size=64, crop_fraction=0.8, mean=0.5, std=0.25)
    assert pre.resize_to == 80
    image = np.full((300, 200), 255, np.uint8)
    out = pre(image)
    assert out.shape == (1, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 64, 64), 2.0))
    torch.testing.assert_close(pre.denormalise(out), torch.ones(1, 64, 64))


def test_mask_follows_the_same_crop_as_the_image():
    pre = Preprocess(size=48, crop_fraction=0.75)
    image = np.zeros((120, 160), np.uint8)
    image[30:60, 40:100] = 255
    mask = image > 0
    tensor = pre(image)
    cropped_mask = pre.crop_mask(mask)
    bright = pre.denormalise(tensor)[0].numpy() > 0.5
    assert cropped_mask.shape == (48, 48)
    assert (bright == cropped_mask).mean() > 0.97


def test_augment_is_deterministic_per_rng_and_keeps_sides():
    aug = Augment(rotation_deg=5, translate=0.04, scale=0.05, brightness=0.1, contrast=0.1)
    image = np.zeros((64, 64), np.uint8)
    image[:, :16] = 200  # bright band on the left: must stay on the left (no horizontal flip)
    a = aug(image, np.random.default_rng([1, 2, 3]))
    b = aug(image, np.random.default_rng([1, 2, 3]))
    c = aug(image, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for _ in range(20):
        out = aug(image, np.random.default_rng(_)).astype(float)
        assert out[:, :24].mean() > out[:, 40:].mean() + 50


def test_augment_pair_moves_image_and_mask_together():
    aug = Augment(rotation_deg=10, translate=0.1, scale=0.1, brightness=0.0, contrast=0.0)
    image = np.zeros((64, 64), np.uint8)
    image[20:40, 10:30] = 255
    mask = image > 0
    for seed in range(10):
        out, moved = aug.pair(image, mask, np.random.default_rng(seed))
        assert moved.dtype == bool and moved.any()
        assert ((out > 127) == moved).mean() > 0.97
