import math

import numpy as np
import pytest

from cycle.metrics import classification_metrics, confusion_matrix, format_table, prefixed


def test_metrics_on_a_known_case():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.55])
    m = classification_metrics(labels, probs, losses=np.full(8, 0.5))
    # TN=2 FP=1 FN=1 TP=4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(0.5)
    # AUC by counting ordered pairs: 13 of 15 positive-negative pairs ranked right
    assert m["auc"] == pytest.approx(13 / 15)
    assert confusion_matrix(labels, probs >= 0.5).tolist() == [[2, 1], [1, 4]]


def test_undefined_values_are_nan_not_errors():
    m = classification_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"]) and math.isnan(m["loss"])
    assert m["sensitivity"] == 0.5


def test_metrics_are_over_images_not_batches():
    # Batch means of accuracy would give (1.0 + 0.0) / 2 = 0.5; over images it is 3/4.
    labels = np.array([1, 1, 1, 0])
    probs = np.array([0.9, 0.9, 0.9, 0.9])
    assert classification_metrics(labels, probs)["accuracy"] == 0.75


def test_prefixed_names_follow_the_design():
    m = classification_metrics(np.array([0, 1]), np.array([0.2, 0.8]), np.array([0.1, 0.1]))
    assert set(prefixed(m, "test_cf")) == {
        "test_cf_loss",
        "test_cf_accuracy",
        "test_cf_sensitivity",
        "test_cf_specificity",
        "test_cf_auc",
    }


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.array([0.5]))


def test_table_renders():
    text = format_table({"val": {"n": 4, "accuracy": 0.5, "loss": 0.7}})
    assert "val" in text and "0.5000" in text and "nan" in text
