import json

import numpy as np
import pytest

from cycle.data.phantom import (
    MASK_KINDS,
    PhantomSpec,
    generate,
    load_mask,
    mask_path,
    write_dataset,
)
from cycle.data.records import scan


def test_generate_is_deterministic_for_a_seed():
    a = generate(6, seed=11, size=96)
    b = generate(6, seed=11, size=96)
    c = generate(6, seed=12, size=96)
    for field in ("images", "lungs", "lesions", "confounders", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.names == b.names and a.patients == b.patients
    assert not np.array_equal(a.images, c.images)


def test_film_i_does_not_depend_on_batch_size():
    whole = generate(8, seed=2, size=96)
    tail = generate(3, seed=2, size=96, start=5)
    np.testing.assert_array_equal(whole.images[5:], tail.images)


def test_masks_align_with_the_anatomy():
    batch = generate(24, seed=4, size=128)
    for i in range(len(batch.labels)):
        img = batch.images[i].astype(np.float64)
        lungs, lesions, conf = batch.lungs[i], batch.lesions[i], batch.confounders[i]
        assert 0.08 < lungs.mean() < 0.45
        # Lungs are dark air inside a brighter body.
        body = (img > 40) & ~lungs & ~conf
        assert img[lungs].mean() < img[body].mean()
        # Lesions lie inside the lungs and are denser than the clear lung around them.
        assert not (lesions & ~lungs).any()
        if batch.labels[i] == 1:
            assert lesions.sum() > 0
            clear = lungs & ~lesions
            assert img[lesions].mean() > img[clear].mean()
        else:
            assert lesions.sum() == 0
        # Confounder boxes hold bright burned-in text and never touch the lungs.
        if conf.any():
            assert img[conf].max() > 200
            assert not (conf & lungs).any()


def test_shortcut_is_linked_in_train_and_reversed_in_counterfactual():
    normal = generate(400, seed=1, size=64)
    cf = generate(400, seed=1, size=64, counterfactual=True)

    def tag_rate(batch, label):
        return np.mean([a["tag"] for a, y in zip(batch.attributes, batch.labels) if y == label])

    assert tag_rate(normal, 1) > 0.8 and tag_rate(normal, 0) < 0.2
    assert tag_rate(cf, 1) < 0.2 and tag_rate(cf, 0) > 0.8
    # the laterality marker is unrelated to the label
    assert abs(np.mean([a["marker"] for a in normal.attributes]) - 0.5) < 0.1


def test_images_of_a_patient_share_label_and_id():
    batch = generate(10, seed=3, size=64, images_per_patient=2)
    for i in range(0, 10, 2):
        assert batch.patients[i] == batch.patients[i + 1]
        assert batch.labels[i] == batch.labels[i + 1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    spec = PhantomSpec.from_config(seed=1, n_train=20, n_val=4, n_test=8, n_test_cf=8, size=64)
    out = tmp_path_factory.mktemp("ph")
    return out, spec, write_dataset(out, spec, workers=2)


def test_written_tree_is_read_by_the_kaggle_loader(tree):
    _, spec, root = tree
    result = scan(root)
    assert not result.skipped
    counts = result.counts()
    assert {s: sum(c.values()) for s, c in counts.items()} == spec.split_sizes()
    meta = json.loads((root / "phantom.json").read_text())
    assert meta["counts"] == counts
    # each record has its three masks, of the image's size, and the written image equals generate()
    record = result.records[0]
    for kind in MASK_KINDS:
        assert mask_path(record.path, kind).is_file()
        assert load_mask(record.path, kind).shape == (64, 64)


def test_written_images_equal_generate(tree):
    import cv2

    from cycle.data.phantom import split_seed

    _, spec, root = tree
    batch = generate(4, seed=split_seed(spec.seed, "test"), size=64, patient_offset=200_000)
    path = next(root.glob(f"test/*/{batch.names[2]}.png"))
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), batch.images[2])
    np.testing.assert_array_equal(load_mask(path, "lungs"), batch.lungs[2])


def test_same_spec_is_reused_and_another_needs_force(tree):
    out, spec, root = tree
    stamp = (root / "phantom.json").stat().st_mtime_ns
    assert write_dataset(out, spec) == root
    assert (root / "phantom.json").stat().st_mtime_ns == stamp
    other = PhantomSpec.from_config(seed=2, n_train=8, n_val=0, n_test=4, n_test_cf=0, size=64)
    with pytest.raises(FileExistsError, match="force"):
        write_dataset(out, other)
    assert write_dataset(out, other, force=True, workers=1) == root
    assert len(scan(root).records) == 12
    assert not (out / "chest_xray.partial").exists()
