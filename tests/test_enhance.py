import numpy as np
import pytest

from cycle.enhance import derangement, enhance_batch, overlay, restrict
from cycle.localization import energy_share


def _batch(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size)).astype(np.float32) * 0.5 + 0.25
    lungs = np.zeros((n, size, size), bool)
    lungs[:, 8:24, 4:14] = True
    lungs[:, 8:24, 18:28] = True
    cams = np.zeros((n, size, size), np.float32)
    cams[:, 12:16, 6:10] = 1.0  # inside the left lung
    return images, cams, lungs


@pytest.mark.parametrize("mode", ["highlight", "suppress", "context_swap"])
def test_strength_zero_is_the_identity(mode):
    images, cams, lungs = _batch()
    out, _ = overlay(images, cams, lungs, 0.0, mode, np.random.default_rng(0))
    np.testing.assert_array_equal(out, images)


def test_highlight_brightens_only_where_the_cam_is_inside_the_lungs():
    images, cams, lungs = _batch()
    cams[:, 0:3, 0:3] = 1.0  # evidence outside the lungs: must be ignored
    out, _ = overlay(images, cams, lungs, 0.8, "highlight", dilate_px=0)
    assert (out[:, 12:16, 6:10] > images[:, 12:16, 6:10] + 0.1).all()
    np.testing.assert_allclose(
        out[:, 0:3, 0:3], images[:, 0:3, 0:3], atol=1e-2
    )  # only the feathered edge
    assert out.max() <= 1.0


def test_suppress_dims_outside_the_lungs_toward_black():
    images, cams, lungs = _batch()
    out, _ = overlay(images, cams, lungs, 1.0, "suppress", dilate_px=0)
    far_outside = np.zeros_like(lungs)
    far_outside[:, 28:, :] = True
    assert out[far_outside].max() < 1e-2  # black, up to the feathered lung edge
    assert (out[:, 12:16, 6:10] >= images[:, 12:16, 6:10] * 0.95).all()  # CAM-weighted lung kept


def test_context_swap_keeps_lungs_and_takes_context_from_another_image():
    images, cams, lungs = _batch(n=5)
    images[:, 0:4, :] = np.arange(5, dtype=np.float32)[:, None, None] / 10  # a per-image "tag"
    out, donors = overlay(
        images, cams, lungs, 1.0, "context_swap", np.random.default_rng(3), dilate_px=0
    )
    assert (donors != np.arange(5)).all() and sorted(donors) == list(range(5))
    for i, j in enumerate(donors):
        np.testing.assert_allclose(out[i, 0:2], images[j, 0:2], atol=1e-3)  # context from j
        np.testing.assert_allclose(out[i, 14, 8], images[i, 14, 8], atol=1e-3)  # lung from i


def test_derangement_has_no_fixed_point():
    for seed in range(50):
        d = derangement(7, np.random.default_rng(seed))
        assert sorted(d) == list(range(7)) and (d != np.arange(7)).all()


def test_trust_rule_and_fallbacks():
    images, cams, lungs = _batch(n=2)
    cams[1] = 0
    cams[1, 0:4, 0:4] = 1.0  # image 1's map points outside the lungs: not trusted
    rng = np.random.default_rng(0)
    share = energy_share(cams, lungs)
    assert share[0] == pytest.approx(1.0) and share[1] == pytest.approx(0.0)

    kept = enhance_batch(images, cams, lungs, "highlight", 0.8, 0.5, "original", rng, dilate_px=0)
    assert kept.trusted.tolist() == [True, False] and kept.keep.all()
    np.testing.assert_allclose(kept.images[1], images[1], atol=1e-6)

    lung_only = enhance_batch(
        images, cams, lungs, "highlight", 0.8, 0.5, "lung_only", rng, dilate_px=0
    )
    assert lung_only.images[1][28:].max() < 1e-2 and lung_only.images[1][14, 8] > 0.2

    dropped = enhance_batch(images, cams, lungs, "highlight", 0.8, 0.5, "drop", rng, dilate_px=0)
    assert dropped.keep.tolist() == [True, False]


def test_flat_cam_is_untrusted_and_nan_safe():
    images, cams, lungs = _batch(n=2)
    cams[:] = 0
    result = enhance_batch(
        images, cams, lungs, "context_swap", 1.0, 0.3, "original", np.random.default_rng(0)
    )
    assert not result.trusted.any() and np.isnan(result.lung_share).all()
    assert np.isfinite(result.images).all()


def test_restrict_renormalises_inside_the_lungs():
    _, cams, lungs = _batch(n=1)
    cams *= 0.3
    r = restrict(cams, lungs.astype(np.float32))
    assert r.max() == pytest.approx(1.0)


def test_bad_arguments():
    images, cams, lungs = _batch(n=2)
    with pytest.raises(ValueError, match="unknown enhance mode"):
        overlay(images, cams, lungs, 0.5, "blur")
    with pytest.raises(ValueError, match="strength"):
        overlay(images, cams, lungs, 1.5, "highlight")
    with pytest.raises(ValueError, match="fallback"):
        enhance_batch(
            images, cams, lungs, "highlight", 0.5, 0.5, "ignore", np.random.default_rng(0)
        )
