"""The context-swap probe on films and classifiers whose answer is known: one network reads
only a corner outside the lungs (a planted tag), another only the middle of the lungs."""

import numpy as np
import pytest
import torch
from torch import nn

from cycle.probe import compose, context_probe, probe_donors

SIZE = 32
LUNGS = np.zeros((SIZE, SIZE), bool)
LUNGS[10:22, 10:22] = True


def films(labels):
    """Label 1: bright lungs and a bright tag in the corner; label 0: dark lungs, no tag."""
    out = np.full((len(labels), SIZE, SIZE), 60, np.uint8)
    for film, label in zip(out, labels):
        film[LUNGS] = 200 if label else 90
        film[:3, :3] = 250 if label else 0
    return out


class Reads(nn.Module):
    """A classifier that answers 1 when the mean of one patch is bright (a fixed conv readout)."""

    def __init__(self, rows: slice, cols: slice):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        bright = x[:, 0, self.rows, self.cols].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(bright), bright - 0.6], dim=1)


def normalise(film):
    return torch.from_numpy(film.astype(np.float32) / 255.0).unsqueeze(0)


LABELS = np.array([0, 1] * 10)
LUNG_MASKS = np.repeat(LUNGS[None], len(LABELS), axis=0)


def probe(model):
    return context_probe(
        model, films(LABELS), LUNG_MASKS, LABELS, normalise, seed=3, dilate_px=2, batch_size=8
    )


def test_a_classifier_that_reads_only_the_context_relies_on_it_fully():
    values = probe(Reads(slice(0, 3), slice(0, 3)))  # the tag's corner
    assert np.all(values["context_reliance"] == 1.0)
    assert np.all(values["lung_consistent_accuracy"] == 0.0)
    assert np.all(values["seam_control_accuracy"] == 1.0)  # same-class context: no harm
    assert np.all(values["context_gap"] == 1.0)  # the context decides every answer


def test_a_classifier_that_reads_only_the_lungs_does_not_rely_on_the_context():
    values = probe(Reads(slice(14, 18), slice(14, 18)))
    assert np.all(values["context_reliance"] == 0.0)
    assert np.all(values["lung_consistent_accuracy"] == 1.0)
    assert np.all(values["seam_control_accuracy"] == 1.0)
    assert np.all(values["context_gap"] == 0.0)


def test_composed_films_keep_the_lungs_and_take_the_donors_context():
    source = films(LABELS)
    composed = compose(source[:2], LUNG_MASKS[:2], source[[1, 0]], dilate_px=2)
    assert composed.dtype == np.uint8
    np.testing.assert_array_equal(composed[:, LUNGS], source[:2][:, LUNGS])
    np.testing.assert_array_equal(composed[:, :3, :3], source[[1, 0]][:, :3, :3])


def test_donors_are_seeded_of_the_class_asked_for_and_never_the_film_itself():
    labels = np.array([0, 0, 1, 1, 1, 0])
    other = probe_donors(labels, seed=1, same_class=False)
    same = probe_donors(labels, seed=1, same_class=True)
    assert np.all(labels[other] != labels) and np.all(labels[same] == labels)
    assert np.all(same != np.arange(len(labels)))
    np.testing.assert_array_equal(other, probe_donors(labels, seed=1, same_class=False))
    many = np.array([0, 1] * 20)
    assert not np.array_equal(
        probe_donors(many, seed=1, same_class=False), probe_donors(many, seed=2, same_class=False)
    )


def test_films_without_a_donor_are_nan_never_a_number():
    labels = np.array([1, 1, 1])  # no NORMAL film: no other-class donor
    values = context_probe(
        Reads(slice(0, 3), slice(0, 3)),
        films(labels),
        np.repeat(LUNGS[None], 3, axis=0),
        labels,
        normalise,
        seed=0,
    )
    assert np.all(np.isnan(values["context_reliance"]))
    assert np.all(np.isnan(values["lung_consistent_accuracy"]))
    assert values["seam_control_accuracy"] == pytest.approx([1.0, 1.0, 1.0])
    assert np.all(np.isnan(values["context_gap"]))  # it needs both composites


def test_on_phantoms_the_probe_composes_with_the_unet_lungs_not_the_truth(phantom_root, tmp_path):
    """The probe must see on phantoms what it sees on real films, where no truth masks exist."""
    from cycle.checkpoint import load_classifier, save_classifier
    from cycle.config import load_config
    from cycle.data.records import records_of, scan
    from cycle.data.transforms import load_grayscale
    from cycle.evaluate import evaluate_localization
    from cycle.lungseg import build_unet, load_lung_model, predict, save_lung_model
    from cycle.models import build_model

    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=tinyvgg", "data.image_size=48"])
    classifier = save_classifier(tmp_path / "best.pt", build_model("tinyvgg", image_size=48), cfg)
    lung_model = save_lung_model(tmp_path / "unet.pt", build_unet(), image_size=48)
    records = records_of(scan(phantom_root).records, "test")[:12]

    # The truth-mask metrics need no U-Net; the probe does, even with truth masks on disk.
    assert "lung_energy_share" in evaluate_localization(classifier, records, "gradcam")
    with pytest.raises(ValueError, match="pass a lung model"):
        evaluate_localization(classifier, records, "gradcam", probe_dilate_px=4)

    # In chunks of 5 films (the last one short): the probe streams, a donor read from any chunk.
    npz = tmp_path / "per_image.npz"
    evaluate_localization(
        classifier,
        records,
        "gradcam",
        lung_model,
        per_image_npz=npz,
        seed=1,
        probe_dilate_px=4,
        batch_size=5,
    )
    model, pre = load_classifier(classifier)
    films = [pre.resize(load_grayscale(r.path)) for r in records]
    crops = np.stack([pre.crop(f) for f in films])
    lungs = np.stack([pre.crop(m) for m in predict(load_lung_model(lung_model), films)])
    labels = np.array([r.label for r in records])
    expected = context_probe(
        model, crops, lungs, labels, pre.normalise, seed=1, dilate_px=4, batch_size=5
    )
    saved = np.load(npz)
    for name, values in expected.items():
        np.testing.assert_array_equal(saved[name], values, err_msg=name)
