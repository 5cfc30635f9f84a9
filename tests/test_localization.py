import math

import numpy as np
import pytest
import torch

from cycle.localization import (
    bootstrap_ci,
    energy_share,
    enrichment,
    flat_summary,
    localization_metrics,
    pointing_game,
)


def _mask(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def test_uniform_map_has_enrichment_one_and_area_share():
    lungs = _mask((10, 10), slice(2, 8), slice(1, 6))  # 30% of the image
    cam = np.ones((10, 10))
    assert energy_share(cam, lungs)[0] == pytest.approx(0.3)
    assert enrichment(cam, lungs)[0] == pytest.approx(1.0)


def test_map_inside_the_mask_scores_full_share():
    lungs = _mask((8, 8), slice(0, 4), slice(0, 8))
    cam = np.zeros((8, 8))
    cam[1, 3] = 0.5
    cam[2, 2] = 1.0
    assert energy_share(cam, lungs)[0] == 1.0
    assert enrichment(cam, lungs)[0] == pytest.approx(2.0)


def test_pointing_game_hit_miss_and_undefined():
    lesion = _mask((6, 6), slice(1, 3), slice(1, 3))
    delta_in = np.zeros((6, 6))
    delta_in[2, 2] = 1
    delta_out = np.zeros((6, 6))
    delta_out[5, 5] = 1
    cams = np.stack([delta_in, delta_out, delta_in, np.zeros((6, 6))])
    masks = np.stack([lesion, lesion, np.zeros((6, 6), bool), lesion])
    result = pointing_game(cams, masks)
    assert result[0] == 1.0 and result[1] == 0.0
    assert math.isnan(result[2])  # no lesion: undefined, not a miss
    assert result[3] == 0.0  # a flat map points nowhere


def test_empty_map_or_mask_gives_nan_not_error():
    cam = np.zeros((4, 4))
    mask = np.ones((4, 4), bool)
    assert math.isnan(energy_share(cam, mask)[0])
    assert math.isnan(energy_share(np.ones((4, 4)), np.zeros((4, 4), bool))[0])


def test_batch_of_torch_maps():
    cams = torch.rand(5, 16, 16)
    lungs = torch.zeros(5, 16, 16, dtype=torch.bool)
    lungs[:, 4:12, 2:14] = True
    values = localization_metrics(cams, lungs, lesions=lungs, confounders=~lungs)
    assert set(values) == {
        "lung_energy_share",
        "lung_enrichment",
        "lesion_pointing_game",
        "lesion_energy_share",
        "confounder_energy_share",
    }
    assert all(v.shape == (5,) for v in values.values())
    np.testing.assert_allclose(values["lung_energy_share"] + values["confounder_energy_share"], 1.0)


def test_bootstrap_interval_covers_the_mean_and_skips_nan():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.6, 0.1, 400), [np.nan] * 10])
    mean, low, high = bootstrap_ci(values)
    assert low < mean < high
    assert mean == pytest.approx(np.nanmean(values))
    assert 0.55 < low and high < 0.65
    assert all(math.isnan(x) for x in bootstrap_ci([np.nan]))
    flat = flat_summary({"lung_energy_share": values})
    assert set(flat) == {
        "lung_energy_share",
        "lung_energy_share_ci_low",
        "lung_energy_share_ci_high",
    }
