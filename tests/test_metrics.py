import numpy as np
import pytest

from melanoma.evaluate import classification_metrics, operating_point, threshold_for_sensitivity
from melanoma.figures import confusion_figure, roc_figure


def test_metrics_on_a_known_confusion_matrix():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.4, 0.3, 0.2, 0.1, 0.1])
    m = classification_metrics(labels, probs, 0.5)
    # tp 3, fn 1, fp 1, tn 5
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["auc"] == pytest.approx(20.5 / 24)  # 20 pairs ordered, one tie


def test_single_class_sets_report_only_defined_metrics():
    benign = classification_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.7, 0.4]), 0.5)
    assert benign == {"accuracy": 0.75, "specificity": 0.75}
    malignant = classification_metrics(np.ones(2, int), np.array([0.9, 0.4]), 0.5)
    assert malignant == {"accuracy": 0.5, "sensitivity": 0.5}


def test_threshold_reaches_the_target_sensitivity_and_no_more_than_needed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 500), 0, 1)
    t = threshold_for_sensitivity(labels, probs, 0.9)
    sens = classification_metrics(labels, probs, t)["sensitivity"]
    assert sens >= 0.9
    assert classification_metrics(labels, probs, np.nextafter(t, 1))["sensitivity"] < 0.9
    with pytest.raises(ValueError, match="without malignant"):
        threshold_for_sensitivity(np.zeros(3, int), np.ones(3), 0.9)


def test_figures_render():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.9])
    assert confusion_figure(labels, probs, 0.5, "t").axes
    assert roc_figure(labels, probs, 0.5, "t").axes


def test_operating_point_gives_the_threshold_and_the_metrics_at_it():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.5, 0.7, 0.3, 0.6, 0.8, 0.9])
    point = operating_point(labels, probs, 0.75)
    assert point.threshold == 0.6  # 3 of 4 melanomas at or above it
    assert point.metrics == classification_metrics(labels, probs, 0.6)
    assert point.metrics["sensitivity"] == 0.75 and point.metrics["specificity"] == pytest.approx(2 / 3)
